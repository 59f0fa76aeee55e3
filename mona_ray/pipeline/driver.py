"""The MoNA job: a short chain of typed steps (``steps.py``) over a frozen plan (``plan.py``).

    check     before Ray starts and before anything is written: settings, paths, tokenizer
    claim     the output folder's lease (publish.py); a half-made publish repaired, old attempts pruned
    plan      row units, device, dtype, readout, fingerprints, store, the embedding job -> RunPlan
    prepare   tasks     read + validate + render + tokenize each unit  -> prepared/<fp>/
    dedupe    driver    duplicate ids rejected (Arrow)
    embed     actors    model + SAE on the rows not in the store yet   -> embeddings/<fp>/
    targets   driver    mean / prototypes of the target rows            -> prototype.safetensors
    score     tasks     similarity per group of store parts -> streamed through a running top-k here
              (a text baseline instead of embed, targets and score: ``steps.score_baseline``)
    write     driver    scores, selection (Parquet + JSONL), trainer files, rejected rows
    explain   task      the prototype's top tokens; the selected rows' latents from the store
    publish   driver    the manifest (from the RunResult), then one rename of ``current``

Where it writes (``publish.py``): each attempt writes its outputs into
``<output_dir>/runs/<run id>/`` under the folder's lease, and a complete run is published by
one atomic rename of ``<output_dir>/current``; readers of ``<output_dir>/selected.jsonl`` see
the previous selection until then. Prepared parts, staged copies and the embedding store
live beside the attempts and are checked before reuse (a damaged one is quarantined and
rebuilt).

Resume and refresh come from one mechanism: every part file is named after its input
unit (prepare) or its content (embed) and written atomically, and the embedding store
is keyed by the content hash of each row under a fingerprint of everything that
changes an embedding (model, SAE, layer, K, rendering, max_length, pooling, dtype).
A re-run therefore skips every finished unit, embeds only rows it has never seen, and
re-embeds everything when a fingerprinted setting changes. We chose this over Ray
Data's ``CheckpointConfig`` because it also gives cross-run refresh (new rows only) and
works the same on every Ray version >= 2.51.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import RunConfig
from ..core import executor, procmem
from ..core.io import write_json
from . import publish, report, steps
from .plan import RunError, RunPlan, begin, check, check_output_dir, make_plan, plan_units

__all__ = ["RunError", "RunResult", "run"]


@dataclass(frozen=True)
class RunResult:
    """A finished run: its plan and every step's result; the manifest is built from it."""

    plan: RunPlan
    prepared: steps.PreparedSets
    rows: steps.Rows
    embedding: steps.Embedding
    targets: steps.Targets | None
    scored: steps.Scored
    written: steps.Written
    explain_read: dict | None
    timings: dict
    memory: dict
    quarantined: list
    manifest: dict | None = None


def run(cfg: RunConfig, cfg_dict: dict) -> RunResult:
    """The whole job for one typed config (``cfg_dict``: the same settings as plain data, for
    the manifest): published in ``run.output_dir`` when it returns."""
    mem = procmem.StageMemory().start()  # the driver's peak memory per step, in the manifest
    clock = procmem.Stages()
    lock = None
    try:
        with clock("plan"):
            inputs = check(cfg)  # a bad path or setting fails in seconds, nothing written, Ray not started
            root = Path(cfg.run.output_dir).expanduser().resolve()
            run_id = publish.new_run_id()
            lock = claim(cfg, root, run_id)
            units = plan_units(cfg, inputs, root)
        mem.mark("plan")
        started = executor.start(executor.address_of(cfg.ray), cfg.ray.num_cpus, cfg.ray.num_gpus,
                                 cfg.ray.log_to_driver)
        try:
            with clock("plan"):  # the device and the actors depend on the cluster's resources
                plan = make_plan(cfg, cfg_dict, inputs, units, root, run_id, executor.resources())
                begin(plan)
            result = _steps(plan, lock, clock, mem)
            write_json(result.manifest, plan.out / "manifest.json")  # last: "complete" means every output is in place
            with _signals_held():  # a TERM now waits until the run is published and pruned
                check_folders(plan, lock)  # the lease too: checked here, not as of the last heartbeat
                publish.publish(root, plan.out)  # one rename: readers switch to this run's selection
                publish.prune(root, int(cfg.run.keep_runs), active=plan.out)
            return result
        finally:
            lock.release()  # first: a scheduler's SIGKILL may follow its SIGTERM within seconds
            executor.stop(started)
    finally:
        mem.stop()
        if lock is not None:
            lock.release()


def _steps(plan: RunPlan, lock: publish.OutputLock, clock: procmem.Stages, mem) -> RunResult:
    def step(name: str, fn, *args):
        with clock(name):
            out = fn(*args)
        mem.mark(name)
        check_folders(plan, lock)
        return out

    quarantined: list[dict] = []  # damaged parts moved aside this run (prepared here, the store's below)
    prepared = step("prepare", steps.prepare, plan, quarantined)
    rows = step("dedupe", steps.dedupe, plan, prepared)
    if plan.embeds:
        embedding, rows = step("embed", steps.embed, plan, prepared, rows)
        targets = step("prototype", steps.targets, plan, rows)
        background = step("background", steps.background, plan, rows)
        scored = step("score", steps.score, plan, rows, targets, background)
    else:
        embedding, targets, background = steps.Embedding(), None, None
        scored = step("score", steps.score_baseline, plan, prepared, rows)
    written = step("write", steps.write_outputs, plan, prepared, rows, scored)
    explain_read = (step("explain", steps.explain, plan, prepared, rows, targets, scored, background)
                    if plan.explains else None)
    result = RunResult(plan, prepared, rows, embedding, targets, scored, written, explain_read, dict(clock.seconds),
                       dict(mem.stages), quarantined + (plan.store.quarantined if plan.store else []))
    return replace(result, manifest=report.manifest(result))


def claim(cfg: RunConfig, root: Path, run_id: str) -> publish.OutputLock:
    """The output folder's lease for this attempt; a publish a stopped run left half made is
    made whole, and unfinished attempts beyond ``run.keep_runs`` are pruned (their parts stay)."""
    root.mkdir(parents=True, exist_ok=True)
    publish.check_layout(root)
    lock = publish.OutputLock(root, run_id, cfg.run.lock_stale_s, wait_s=cfg.run.lock_wait_s).acquire()
    try:
        last = publish.published(root)
        if last:
            with _signals_held():
                publish.publish(root, last)
        check_output_dir(root, cfg.run.overwrite)  # again under the lease: a run may have finished meanwhile
        publish.prune(root, int(cfg.run.keep_runs))
    except BaseException:
        lock.release()
        raise
    return lock


def check_folders(plan: RunPlan, lock: publish.OutputLock) -> None:
    """Stop with one line when a folder the run writes is no longer the one it started with
    (its mount went away or was replaced: writes would land on the disk beneath it), or when
    another run took the lease."""
    for what, (path, ident) in plan.folders.items():
        if publish.identity(path) != ident:
            raise RunError(f"{what} {path} went away while the run was writing it (an unmounted or remounted "
                           "filesystem?). Mount it again, then run the same command again to resume")
    if lock.lost:
        raise RunError(f"another run took the lease of run.output_dir={str(plan.root)!r} while this one ran "
                       f"(no heartbeat for run.lock_stale_s={plan.cfg.run.lock_stale_s:g} s?); this run stops "
                       f"unpublished (its outputs so far: {plan.out})")


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM held (delivered when the block ends) while the published state changes."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
