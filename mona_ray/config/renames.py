"""Settings that were renamed or removed, and the spellings one entry point uses for another's
setting: when a command line with one of these keys does not compose, the error names the
key to use instead (``threads`` is now ``embed.torch_threads``).

Keys are override keys as typed (``+``/``~`` stripped); a key ending in ``.*`` renames a prefix
(``sae_train.data.path`` -> ``data.path``), after which the rest is looked up again. A value
starting with ``-`` means the setting was removed; the rest says why.
"""

from __future__ import annotations

COMMON = {
    "model": "model.path",  # a scalar for the model: the SAE tools' old spelling
    "model_dtype": "model.dtype",
    "device": "model.device",
    "max_length": "render.max_length",
    "system_prompt": "render.system_prompt",
}

RENAMES: dict[str, dict[str, str]] = {
    "config": {
        "threads": "embed.torch_threads", "torch_threads": "embed.torch_threads",
        "hookpoint": "sae.hookpoint", "hookpoints": "sae.hookpoint", "sae.hookpoints": "sae.hookpoint",
        "output_dir": "run.output_dir", "store_dir": "embed.store_dir",
    },
    "eval/default": {
        "threads": "embed.torch_threads", "torch_threads": "embed.torch_threads",
        "embed.chunk_rows": "embed.rows_per_unit",
        "embed.keep_residuals": "-model features are kept in the feature store (embed.store_dir)",
        "hookpoint": "sae.hookpoint", "hookpoints": "mona.hookpoints", "sae.hookpoints": "mona.hookpoints",
        "run.output_dir": "output_dir", "store_dir": "embed.store_dir",
    },
    "train_sae": {
        "sae_train.*": "*",  # the preset is still chosen with sae_train=<name>; its settings are top-level
        "threads": "torch_threads", "train.threads": "torch_threads", "embed.torch_threads": "torch_threads",
        "hookpoint": "hookpoints", "sae.hookpoint": "hookpoints", "sae.hookpoints": "hookpoints",
        "output_dir": "out_dir", "out": "out_dir",
    },
    "sae_eval": {
        "threads": "torch_threads", "embed.torch_threads": "torch_threads",
        "sae.hookpoints": "hookpoints", "hookpoint": "sae.hookpoint",
        "output_dir": "out", "out_dir": "out",
    },
}


def renamed(name: str, key: str, value: str | None = None) -> str | None:
    """What ``key`` is called now in config ``name`` (``-reason`` if it was removed), or None
    if it is not a known old spelling. ``value``: the override's value (``model={...}`` is the
    section, not the old scalar)."""
    table = {**COMMON, **RENAMES.get(name, {})}
    new = table.get(key)
    if new is None:
        for old, repl in table.items():
            if old.endswith(".*") and key.startswith(old[:-1]):
                rest = key[len(old) - 1:]
                return repl.replace("*", renamed(name, rest, value) or rest)
        return None
    if new.startswith(key + ".") and value is not None and value.lstrip().startswith("{"):
        return None
    return new


def rename_message(name: str, key: str, value: str | None = None) -> str | None:
    new = renamed(name, key, value)
    if new is None:
        return None
    if new.startswith("-"):
        return f"`{key}` was removed: {new[1:]}"
    return f"`{key}` is now `{new}`" + (f": use {new}={value}" if value is not None else "")
