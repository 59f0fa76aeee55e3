"""Settings.

- ``schema.py``: the typed dataclasses, the one source of every default and of each setting's
  documentation, and the tuples of allowed values of every enumerated setting
  (``REPRESENTATIONS``, ``SIMILARITIES``, ...; ``mona_ray.config.schema`` needs only omegaconf).
  The four top-level classes are stored in Hydra's ConfigStore on import.
- ``mona_ray/conf``: the Hydra config tree. A primary file only names its schema in its
  ``defaults:`` list (and Hydra's own settings); presets and experiments override it.
- ``validate``: checks beyond types; ``load_config``: composition from Python; the
  ``${mona_ray.asset:...}`` resolver.

Every entry point does the same three things::

    exit_on_bad_command_line("config")   # in main(), before @hydra.main composes
    validate(cfg)                         # first thing in the task function; ConfigError -> exit 2
    to_typed(cfg)                         # a RunConfig / EvalConfig / ... object, where wanted
"""

from __future__ import annotations

import dataclasses
import sys
from importlib.resources import files
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .renames import RENAMES, rename_message, renamed
from .schema import (EmbedConfig, EvalConfig, ModelConfig, PoolConfig, RenderConfig, RunConfig, SaeConfig,
                     SaeEvalConfig, SCHEMAS, SELECT_K, SHIPPED_SAE, TrainSaeConfig, field_docs)
from .validate import ConfigError, composition_error, split_override, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def asset_path(rel: str) -> str:
    """``${mona_ray.asset:demo/source.parquet}`` in configs: a file shipped inside the package."""
    return str(Path(str(files("mona_ray") / "assets" / rel)))


def shipped_sae_k(sae_path) -> int | None:
    """``${mona_ray.select_k:${sae.path}}``, the run's default ``sae.k``: ``SELECT_K`` (16) when
    ``sae.path`` is the shipped SmolLM2 SAE, which it was chosen for (docs/evaluation.md, round 2);
    None (the SAE's own K) for any other SAE."""
    shipped = Path(asset_path(SHIPPED_SAE))
    try:
        same = sae_path is not None and Path(str(sae_path)).expanduser().resolve() == shipped.resolve()
    except OSError:
        same = False
    return SELECT_K if same else None


if not OmegaConf.has_resolver("mona_ray.asset"):
    OmegaConf.register_new_resolver("mona_ray.asset", asset_path)
if not OmegaConf.has_resolver("mona_ray.select_k"):
    OmegaConf.register_new_resolver("mona_ray.select_k", shipped_sae_k)

for _store_name, _schema in SCHEMAS.values():  # the primary YAML files' defaults lists name these
    ConfigStore.instance().store(name=_store_name, node=_schema)


def load_config(overrides: list[str] | None = None, name: str = "config") -> DictConfig:
    """The composed, validated config ``name`` (``config``, ``eval/default``, ``train_sae``,
    ``sae_eval``) for ``overrides`` (as on the command line), composed from the same folder
    as its CLI does. Raises :class:`ConfigError` for an unknown key, a wrong type or value."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    where = CONF_DIR / name
    try:
        with initialize_config_dir(config_dir=str(where.parent), version_base=None):
            cfg = compose(config_name=where.name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise composition_error(e, name, overrides) from None
    return validate(cfg)


def check_command_line(name: str, argv: list[str] | None = None) -> None:
    """Compose and validate ``name`` with the overrides of this process's command line before
    ``@hydra.main`` does, so a bad key is one ``ConfigError`` line instead of Hydra's report.
    Skipped for what only Hydra handles (--help, --info, --multirun, another config)."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.multirun
            or args.config_path or args.config_name or args.config_dir or args.experimental_rerun):
        return
    load_config(args.overrides, name)


def exit_on_bad_command_line(name: str) -> None:
    """:func:`check_command_line`, printing ``mona_ray: error: ...`` and exiting 2 on a ConfigError."""
    try:
        check_command_line(name)
    except ConfigError as e:
        print(f"mona_ray: error: {e}", file=sys.stderr)
        raise SystemExit(2)


def to_typed(cfg: DictConfig):
    """The composed config as its schema's dataclass object (``RunConfig``, ``EvalConfig``,
    ``TrainSaeConfig``, ``SaeEvalConfig``), interpolations resolved; nested sections are
    dataclasses too, dict/list settings plain dicts/lists. A config that is already typed is
    returned as it is."""
    if not isinstance(cfg, DictConfig):
        return cfg
    return OmegaConf.to_object(cfg)


def to_plain(cfg) -> dict:
    """The config (composed or typed) as plain dicts and lists, interpolations resolved: what a
    manifest or a results document records."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dataclasses.asdict(cfg)


__all__ = [
    "CONF_DIR", "ConfigError", "EmbedConfig", "EvalConfig", "ModelConfig", "PoolConfig", "RENAMES",
    "RenderConfig", "RunConfig", "SaeConfig", "SaeEvalConfig", "TrainSaeConfig", "asset_path",
    "check_command_line", "composition_error", "exit_on_bad_command_line", "field_docs", "load_config",
    "rename_message", "renamed", "split_override", "to_plain", "to_typed", "validate"]
