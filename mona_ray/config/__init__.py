"""Settings: the Hydra config tree (``mona_ray/conf``), its ``${mona_ray.asset:...}`` resolver
and composition from Python (``load_config``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def asset_path(rel: str) -> str:
    """``${mona_ray.asset:demo/source.parquet}`` in configs: a file shipped inside the package."""
    return str(Path(str(files("mona_ray") / "assets" / rel)))


if not OmegaConf.has_resolver("mona_ray.asset"):
    OmegaConf.register_new_resolver("mona_ray.asset", asset_path)


def load_config(overrides: list[str] | None = None, name: str = "config") -> DictConfig:
    """The resolved config ``name`` (``config``, ``eval/default``, ``train_sae``, ``sae_eval``) for
    ``overrides`` (as on the command line), for use from Python."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=name, overrides=list(overrides or []))
