"""Command line: ``python -m mona_ray.run [overrides]`` (also installed as ``mona-ray``).

Examples::

    python -m mona_ray.run                                  # the embedded demo
    python -m mona_ray.run +experiment=openhermes_llama3 model.path=... sae.path=...
    python -m mona_ray.run select.ratio=0.1 run.output_dir=outputs/ten_percent
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .model import ModelError
from .pipeline import Pipeline, RunError
from .records import InputError
from .sae import SAEError

USER_ERRORS = (RunError, InputError, ModelError, SAEError)


def asset_path(rel: str) -> str:
    """``${mona_ray.asset:demo/source.parquet}`` in configs: a file shipped inside the package."""
    return str(Path(str(files("mona_ray") / "assets" / rel)))


if not OmegaConf.has_resolver("mona_ray.asset"):
    OmegaConf.register_new_resolver("mona_ray.asset", asset_path)


CONF_DIR = Path(__file__).parent / "conf"


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """The resolved config for ``overrides`` (as on the command line), for use from Python."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides or []))


def run(cfg: DictConfig, quiet: bool = False) -> dict:
    """Run the whole job for a resolved config; returns the manifest."""
    from . import report

    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    p = Pipeline(cfg, cfg_dict)
    manifest = p.run()
    if not quiet:
        print(report.summary(manifest, p.selected), flush=True)
    return manifest


@hydra.main(config_path="conf", config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as e:
        print(f"mona_ray: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("mona_ray: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
