"""Checks beyond types (:func:`validate`) and one-line messages for Hydra's composition errors
(:func:`composition_error`); both raise :class:`ConfigError`."""

from __future__ import annotations

import difflib
import re
from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from .renames import rename_message
from .schema import SCHEMAS, RunConfig


class ConfigError(ValueError):
    """A setting that does not exist or has a value it cannot take; the message is one line
    and names the key. The CLIs print it as ``mona_ray: error: ...`` and exit 2."""


def _name_of(schema: type) -> str | None:
    return next((n for n, (_, cls) in SCHEMAS.items() if cls is schema), None)


def _unknown(name: str | None, key: str, known: list[str]) -> ConfigError:
    msg = rename_message(name, key) if name else None
    if msg:
        return ConfigError(msg)
    leaf, parent = key.rsplit(".", 1)[-1], key.rpartition(".")[0]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else \
        f"the settings{' of ' + parent if parent else ''} are {', '.join(known)}"
    return ConfigError(f"`{key}` is not a setting; {hint}")


def validate(cfg: DictConfig, schema: type | None = None) -> DictConfig:
    """Check a composed config against its schema (by default the structured type it was
    composed on): no key the schema lacks (a ``+key=...`` override is not type-checked by
    Hydra), and every field's rule (allowed values, positive sizes, ranges). Returns ``cfg``;
    raises :class:`ConfigError` naming the first bad key and what it may be."""
    schema = schema or OmegaConf.get_type(cfg)
    if not (isinstance(schema, type) and is_dataclass(schema)):
        raise TypeError(f"validate: {type(cfg).__name__} was not composed on a schema; pass schema=")
    _check(cfg, schema, "", _name_of(schema))
    if schema is RunConfig and cfg.select.count is None and cfg.select.ratio is None:
        raise ConfigError("select.ratio and select.count are both null: set select.ratio=0.05 or select.count=N")
    return cfg


def _check(node: DictConfig, schema: type, prefix: str, name: str | None) -> None:
    by_name = {f.name: f for f in fields(schema)}
    for key in node.keys():
        if key not in by_name:
            raise _unknown(name, f"{prefix}{key}", list(by_name))
    for f in fields(schema):
        if OmegaConf.is_missing(node, f.name):
            continue  # ??? : the consumer says which override sets it when it is needed
        try:
            value = node[f.name]
        except OmegaConfBaseException as e:  # an interpolation that does not resolve
            raise ConfigError(f"{prefix}{f.name}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
        sub = f.type if isinstance(f.type, type) and is_dataclass(f.type) else None
        if sub is not None and isinstance(value, DictConfig):
            _check(value, sub, f"{prefix}{f.name}.", name)
        check = f.metadata.get("check")
        if check is None:
            continue
        for v in (value if isinstance(value, (list, ListConfig)) else [value]):
            problem = check(v)
            if problem:
                raise ConfigError(f"{prefix}{f.name}={_show(value)}: {problem}")


def _show(value: Any) -> str:
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value)
    return repr(value) if isinstance(value, str) else str(value).replace(" ", "")


# ----------------------------------------------------------------------------- Hydra's errors

_OVERRIDE_KEY = re.compile(r"^[+~]*([^=]*)=?(.*)$", re.S)


def split_override(override: str) -> tuple[str, str | None]:
    """``+a.b=1`` -> (``a.b``, ``1``); ``~a`` -> (``a``, None)."""
    m = _OVERRIDE_KEY.match(override.strip())
    key, value = m.group(1).strip(), m.group(2)
    return key.split("@")[0], (value if "=" in override else None)


def composition_error(exc: BaseException, name: str, overrides: list[str]) -> ConfigError:
    """Hydra's (or OmegaConf's) error for composing ``name`` with ``overrides`` as one line
    naming the key; an old spelling among the overrides gets the rename message."""
    for o in overrides:
        key, value = split_override(o)
        msg = rename_message(name, key, value)
        if msg:
            return ConfigError(msg)
    cause = exc.__cause__ or exc
    text = f"{exc}\n{cause}" if cause is not exc else str(exc)
    m = re.search(r"full_key: (\S+)", text)
    full_key = getattr(cause, "full_key", None) or (m.group(1) if m else "")
    m = re.match(r"In '([^']+)'", str(exc))
    where = f"{m.group(1)}: " if m else ""  # a config file (not an override) holds the bad key
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if full_key:
        if "is not in struct" in text:  # a new key in a free-form dict setting (select.bm25, ...)
            parent = full_key.rpartition(".")[0]
            return ConfigError(f"{where}`{full_key}`: `{parent}` takes any keys, but a new one needs a +: "
                               f"+{full_key}=... or +{parent}={{...}}")
        m = re.search(r"Key '[^']+' not in '(\w+)'", text)
        if m or isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            cls = _schema_class(m.group(1)) if m else None
            known = [f.name for f in fields(cls)] if cls else []
            return ConfigError(where + str(_unknown(name, full_key, known)))
        skip = ("In '", "Error merging", "Could not", "full_key:", "reference_type=", "object_type=")
        problem = next((ln for ln in lines if not ln.startswith(skip)), type(cause).__name__)
        bad = next((o for o in overrides if split_override(o)[0] == full_key), full_key)
        return ConfigError(f"{where}{bad}: {problem}")
    kept = []
    for ln in lines:
        if ln.startswith("Config search path"):
            break
        if ln not in kept:
            kept.append(ln)
    return ConfigError(" ".join(kept) or type(exc).__name__)


def _schema_class(cls_name: str) -> type | None:
    from . import schema

    cls = getattr(schema, cls_name, None)
    return cls if isinstance(cls, type) and is_dataclass(cls) else None
