"""The selection job's command line: ``python -m mona_ray.run [overrides]`` (also installed as ``mona-ray``).

Examples::

    python -m mona_ray.run                                  # the embedded demo
    python -m mona_ray.run +experiment=openhermes_llama3 model.path=... sae.path=...
    python -m mona_ray.run select.ratio=0.1 run.output_dir=outputs/ten_percent
"""

from __future__ import annotations

import signal
import sys

import hydra
from omegaconf import DictConfig

from ..config import CONF_DIR, ConfigError, RunConfig, exit_on_bad_command_line, to_plain, to_typed, validate  # registers resolver and schemas
from ..core.executor import ClusterUnreachable
from ..core.hub import HubError
from ..core.io import damaged_file, filesystem_failure, set_aside
from ..core.model import ModelError
from . import driver
from .driver import RunError
from .publish import OutputBusy, PublishError
from ..core.records import InputError
from ..core.sae import SAEError

USER_ERRORS = (ConfigError, RunError, InputError, ModelError, SAEError, OutputBusy, PublishError,
               ClusterUnreachable, HubError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, Kubernetes, Slurm), handled like Ctrl-C: the run stops cleanly."""


_sigterm = []  # set once a SIGTERM arrived: Ray turns the exception raised inside ray.get/ray.wait into a plain
# KeyboardInterrupt, so the exception alone cannot say which signal stopped the run


def _on_sigterm(signum, frame):
    _sigterm.append(signum)
    raise Terminated()


def run(cfg: DictConfig | RunConfig, quiet: bool = False) -> dict:
    """Run the whole job for a validated config (``load_config``'s result, or its typed
    :class:`RunConfig`); returns the manifest. The job reads only the typed object."""
    from . import report

    result = driver.run(to_typed(cfg), to_plain(cfg))
    if not quiet:
        print(report.summary(result.manifest, result.written.selected), flush=True)
    return result.manifest


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run(validate(cfg))
    except USER_ERRORS as e:
        print(f"mona_ray: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM during the clean-up changes nothing
        term = isinstance(e, Terminated) or bool(_sigterm)
        what = "terminated (SIGTERM)" if term else "interrupted"
        print(f"mona_ray: {what}; run the same command again to resume", file=sys.stderr)
        sys.exit(143 if term else 130)
    except Exception as e:  # noqa: BLE001 - a full disk, a vanished mount, a damaged part: one line, no traceback
        line = filesystem_failure(e)
        bad = damaged_file(e) if line is None else None
        if bad is not None and _is_ours(bad.path, cfg):  # a part that passed the cheap check but does not read
            set_aside(bad.path, bad.reason, "file", "it is rebuilt when the same command runs again")
            line = f"{bad}; moved aside: run the same command again to rebuild it and finish"
        elif bad is not None:
            line = str(bad)
        if line is None:
            raise
        print(f"mona_ray: error: {line}", file=sys.stderr)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_ours(path: str, cfg) -> bool:
    """Whether ``path`` is a file the job wrote (under run.output_dir or embed.store_dir), which it
    may move aside and rebuild; never a user's file."""
    from pathlib import Path

    roots = [cfg.run.output_dir] + ([cfg.embed.store_dir] if cfg.embed.store_dir else [])
    p = Path(path).resolve()
    return any(p.is_relative_to(Path(str(r)).expanduser().resolve()) for r in roots)


def main() -> None:
    exit_on_bad_command_line("config")  # a bad key or value: one line and exit 2, before Hydra's own report
    _hydra_main()


if __name__ == "__main__":
    main()
