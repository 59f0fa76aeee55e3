"""``python -m mona_ray.config [NAME] [OVERRIDES...]``: a composed config as YAML with every
setting's documentation (from the schema's dataclasses) as comments above it: the commented
reference of the settings. NAME is a config as for ``load_config`` (``config``, the default;
``eval/default``, ``train_sae``, ``sae_eval``); OVERRIDES as on that command's line, e.g.
``python -m mona_ray.config config +experiment=mona_paper``."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import fields, is_dataclass

from omegaconf import DictConfig, OmegaConf

from . import ConfigError, load_config
from .schema import SCHEMAS, field_docs


def commented_yaml(cfg: DictConfig, schema: type | None = None, indent: str = "") -> str:
    """``cfg`` (composed on ``schema``, by default its own type) as YAML, interpolations kept,
    each setting preceded by its documentation as ``#`` lines."""
    schema = schema or OmegaConf.get_type(cfg)
    docs, plain, out = field_docs(schema), OmegaConf.to_container(cfg), []
    for f in fields(schema):
        for line in textwrap.wrap(" ".join(docs.get(f.name, "").split()), 100 - len(indent)):
            out.append(f"{indent}# {line}")
        sub = f.type if isinstance(f.type, type) and is_dataclass(f.type) else None
        if sub is not None and isinstance(cfg[f.name], DictConfig):
            out.append(f"{indent}{f.name}:")
            out.append(commented_yaml(cfg[f.name], sub, indent + "  "))
        else:
            out.append(textwrap.indent(OmegaConf.to_yaml({f.name: plain[f.name]}).rstrip("\n"), indent))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    name = argv[0] if argv and argv[0] in SCHEMAS else "config"
    overrides = argv[1:] if argv and argv[0] in SCHEMAS else argv
    try:
        print(commented_yaml(load_config(overrides, name)))
    except ConfigError as e:
        print(f"mona_ray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
