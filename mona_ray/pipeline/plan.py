"""The run plan: every decision a run makes before any task starts.

Two steps, because the second needs what the first may not touch yet:

* :func:`check` (before Ray starts and before anything is written): the settings, every path
  (all problems reported at once), the tokenizer against the rendering, a finished run in
  ``run.output_dir``; returns the :class:`Inputs` it found.
* :func:`make_plan` (under the output folder's lease, with the cluster's resources known): the
  row units of every input file, device and dtype, the readout, the fingerprints that key the
  prepared rows and the embedding store, the embedding job and its actors; returns a frozen
  :class:`RunPlan` that every later step reads and none changes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..config import RunConfig
from ..config.schema import REPRESENTATIONS
from ..core import executor, hub, readers, storage
from ..core.io import sha as _sha
from ..core.io import write_json
from ..core.model import ModelError, fingerprint_model, parse_hookpoint, resolve_model_path
from ..core.readers import ReadUnit
from ..core.records import InputError
from ..core.render import render, tokenize
from ..core.sae import SAEError, to_sparsify_hookpoint
from ..features.engine import Batching
from ..features.local import Rendering
from ..features.readouts import Readout, rds_readout
from ..features.spec import (EngineJob, SaeRef, engine_memory, num_layers, readout_width, representation_readout,
                             sae_ref)
from ..features.store import FeatureStore
from . import publish

FINGERPRINT_VERSION = 2
MODEL_METHODS = ("mona", "rds")  # the methods that embed rows with the model (the others read text)


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


@dataclass(frozen=True)
class Inputs:
    """What :func:`check` found: the model's folder, the SAE (None when the run needs none), the
    input files of each set (a local ``Path`` or an object's URL) and each file's version, taken
    before any of it is read: an object that changes after it is indexed is seen by the next run."""

    model_dir: Path
    sae: SaeRef | None
    files: dict[str, list[Path | str]]
    hub: dict = field(default_factory=dict)  # setting -> what its hub ids resolved to (hub.Resolved, or a list)
    versions: dict = field(default_factory=dict)  # str(file) -> storage.FileVersion (size, mtime or ETag)

    @property
    def model_hub(self) -> str:
        """model.path's hub reference at its commit ("" for a local model)."""
        r = self.hub.get("model.path")
        return r.pinned if r else ""


@dataclass(frozen=True)
class RunPlan:
    """Everything a run decided before its first task: read by every step, changed by none."""

    cfg: RunConfig
    cfg_dict: dict  # the same settings as plain data, recorded in the manifest
    root: Path  # run.output_dir, what readers see (publish.py)
    run_id: str
    out: Path  # this attempt's outputs, published at the end
    model_dir: Path
    sae: SaeRef | None
    hub: dict  # setting -> what its hub ids resolved to (for the manifest)
    versions: dict  # str(input file) -> storage.FileVersion, as planned: names the prepared parts
    model_hub: str  # model.path's hub reference at its commit ("" for a local model)
    units: dict[str, list[ReadUnit]]  # "source" / "target": each file split into row units
    device: str
    dtype: str
    dtype_reason: str
    rendering: Rendering
    model_fp: str
    prep_fp: str
    embed_fp: str | None  # None (and no readout, store or job) for a text baseline: it embeds nothing
    readout: Readout | None
    width: int  # values per embedding row
    similarity: str
    aggregate: str
    rds_published: bool  # RDS+ as its authors' code runs it (file order, a taken row spends its turn)
    batching: Batching
    prepared_dir: Path
    store: FeatureStore | None
    num_actors: int
    actor_resources: dict  # an embedding actor's (or the explain task's) resources and memory, as the executor takes them
    job: EngineJob | None  # what each embedding actor loads and runs
    folders: dict  # the folders a run writes, as they were at the start: a mount that goes away is noticed

    @property
    def method(self) -> str:
        return self.cfg.select.method

    @property
    def embeds(self) -> bool:
        """Whether the run embeds rows with the model (MoNA, RDS+) rather than reading their text."""
        return self.readout is not None

    @property
    def explains(self) -> bool:
        return self.method == "mona" and bool(self.cfg.report.explain) and self.readout.kind == "sae"


# ----------------------------------------------------------------------------- before anything


def needs_sae(cfg: RunConfig) -> bool:
    """Whether the run reads an SAE: MoNA on SAE codes, or on MLP gates at the SAE's K."""
    if cfg.select.method != "mona":
        return False  # RDS+ reads hidden states; the text baselines read no model at all past the tokenizer
    return cfg.embed.representation == "sae" or (cfg.embed.representation == "mlp_gate" and not cfg.embed.mlp_k
                                                 and bool(cfg.sae.path))


def resolve_sae(cfg: RunConfig, resolved: dict | None = None) -> SaeRef | None:
    """The run's SAE (metadata only; from the hub only the hooked layer's files), or None when
    the run needs none."""
    return sae_at(cfg.sae, cfg.sae.hookpoint, resolved) if needs_sae(cfg) else None


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to redo a finished run unless asked. Nothing is deleted: a redo writes a new
    attempt and the finished selection stays published until the new one replaces it."""
    if (publish.published_manifest(out) or {}).get("status") == "complete" and not overwrite:
        raise RunError(f"run.output_dir={str(out)!r} already holds a finished run. Pass run.overwrite=true "
                       "to redo it (the finished selection stays readable until the new one replaces it; "
                       "prepared rows and embeddings are reused), or choose another run.output_dir.")


def check(cfg: RunConfig) -> Inputs:
    """Every check that needs no cluster and writes nothing: a bad path or setting fails in
    seconds. Normalises ``cfg.sae.hookpoint`` (SAELens hook names are accepted too)."""
    if cfg.embed.representation not in REPRESENTATIONS:
        raise RunError(f"embed.representation={cfg.embed.representation!r}: use {', '.join(REPRESENTATIONS[:-1])} "
                       f"or {REPRESENTATIONS[-1]}")
    if cfg.select.background != "none" and (cfg.select.method != "mona" or cfg.embed.representation == "hidden"):
        raise RunError(f"select.background={cfg.select.background} weighs sparse codes: it needs select.method=mona "
                       f"with embed.representation=sae or mlp_gate (here {cfg.select.method}, "
                       f"{cfg.embed.representation}); set select.background=none")
    cfg.sae.hookpoint = to_sparsify_hookpoint(cfg.sae.hookpoint)
    check_posix_outputs(cfg)
    address = executor.address_of(cfg.ray)
    if address:
        executor.check_reachable(address)  # ray.init retries an unreachable address for minutes
    parse_hookpoint(cfg.sae.hookpoint)
    # local paths first, the hub after: a misspelt local path is reported before anything is fetched
    roles = {role: list(getattr(cfg, role).paths) for role in ("source", "target")}
    is_hub = {"model.path": hub.is_hub_ref(cfg.model.path, "model"),
              "sae.path": needs_sae(cfg) and hub.is_hub_ref(cfg.sae.path, "sae")}
    problems, resolved, got = [], {}, {}  # got: what each setting (each input path) came to

    def attempt(key, fn, errors):
        try:
            got[key] = fn()
        except errors as e:
            problems.append(str(e))

    def inputs(hub_side: bool) -> None:
        if is_hub["model.path"] == hub_side:
            attempt("model.path", lambda: local_model(cfg.model.path, resolved), (ModelError, hub.HubError))
        if is_hub["sae.path"] == hub_side:
            attempt("sae.path", lambda: resolve_sae(cfg, resolved), (SAEError, hub.HubError))
        for role, paths in roles.items():
            what = f"{role}.paths"
            for i, x in enumerate(paths):
                if hub.is_hub_ref(x, "dataset") == hub_side:
                    attempt((what, i), lambda x=x, what=what: _dataset_files(x, what, resolved),
                            (hub.HubError, InputError))

    for hub_side in (False, True):
        inputs(hub_side)
        if problems:
            raise InputError("\n  ".join(["cannot start:"] + problems) if len(problems) > 1 else problems[0])
    files = {role: [f for i in range(len(paths)) for f in got[(f"{role}.paths", i)]] for role, paths in roles.items()}
    versions = storage.versions([f for role in files for f in files[role]])  # one HEAD per object
    for role in ("source", "target"):
        if not files[role]:
            raise InputError(f"the {role} set {getattr(cfg, role).paths} has no usable rows: no .parquet/.jsonl/.json/.arrow "
                             f"(or .jsonl.gz/.json.gz) file or save_to_disk folder matched; set {role}.paths=[...]")
    model_dir = got["model.path"]
    check_tokenizer(cfg, model_dir)
    check_output_dir(Path(cfg.run.output_dir).expanduser().resolve(), cfg.run.overwrite)
    return Inputs(model_dir, got.get("sae.path"), files, resolved, versions)


def check_posix_outputs(cfg: RunConfig) -> None:
    """Outputs and the embedding store are written with atomic renames and leases: a POSIX
    filesystem (a local disk, NFS, Lustre, a mounted bucket), never an object-store URL."""
    for what, value in (("run.output_dir", cfg.run.output_dir), ("embed.store_dir", cfg.embed.store_dir)):
        if value and storage.is_url(str(value)):
            raise RunError(f"{what}={str(value)!r}: outputs and the embedding store are written to a POSIX "
                           "filesystem (atomic renames, a lease); object-store URLs are read as inputs only. "
                           f"Set {what} to a local or shared folder (NFS, Lustre, or the bucket mounted)")


def _dataset_files(x, what: str, resolved: dict) -> list[Path]:
    """One entry of ``source.paths``/``target.paths``: its input files (a hub dataset's, fetched)."""
    if not hub.is_hub_ref(x, "dataset"):
        try:
            return readers.input_files([x])
        except InputError as e:
            raise InputError(f"{what}: {e}; set {what}=[/path/to/files_or_folders or URLs]") from None
    r = hub.resolve_dataset(str(x), what)
    resolved.setdefault(what, []).append(r)
    return readers.input_files([str(f) for f in r.files])


# ----------------------------------------------------------------------------- the model side, for every command
# (the run, the evaluation, train_sae and eval_sae read model.path and sae.path through these)


def _from_hub(resolved: dict | None, what: str, ref, resolve, *args) -> tuple[str, "hub.Resolved | None"]:
    """``ref`` itself when it is a local path, else the local folder of what it names on the hub
    (recorded in ``resolved[what]``), with what it resolved to."""
    if not hub.is_hub_ref(ref, "sae" if what == "sae.path" else "model"):
        return ref, None
    r = resolve(str(ref), *args, what=what)
    if resolved is not None:
        resolved[what] = r
    return str(r.path), r


def local_model(path, resolved: dict | None = None, what: str = "model.path") -> Path:
    """``model.path`` as a local checkpoint folder: the folder, ``embedded:...``, or a hub id's
    files in the hub cache (fetched when not there; recorded in ``resolved[what]``)."""
    return resolve_model_path(str(_from_hub(resolved, what, path, hub.resolve_model)[0]))


def sae_path(path, hookpoint: str, resolved: dict | None = None) -> str:
    """``sae.path`` as a local folder holding the SAE for ``hookpoint`` (a hub id: only its files)."""
    return _from_hub(resolved, "sae.path", path, hub.resolve_sae, hookpoint)[0]


def sae_at(sae_cfg, hookpoint: str, resolved: dict | None = None) -> SaeRef:
    """The SAE of ``sae.*`` for ``hookpoint`` (metadata only), with its pinned hub reference when
    ``sae.path`` is a hub id (a node without the driver's cache fetches the same commit)."""
    path, r = _from_hub(resolved, "sae.path", sae_cfg.path, hub.resolve_sae, hookpoint)
    ref = sae_ref(path, sae_cfg.format, hookpoint, sae_cfg.k)
    return replace(ref, hub=r.pinned) if r is not None else ref


def model_fingerprint(model_dir: Path, model_hub: "hub.Resolved | None") -> str:
    """The model's fingerprint; from the hub, its commit too (a moved branch re-embeds, a pinned
    revision reproduces)."""
    fp = fingerprint_model(model_dir)
    return _sha([fp, model_hub.commit])[:16] if model_hub is not None else fp


def compute_on(model_cfg, resources: dict) -> tuple[str, str, str]:
    """``(device, dtype, why)``: where and in what dtype the model runs, given the resources the
    work runs on (a cluster's, or this machine's: :func:`local_resources`)."""
    device = model_cfg.device if str(model_cfg.device).startswith("cuda:") else (
        "cuda" if _use_gpu(model_cfg.device, resources) else "cpu")
    dtype, why = _resolve_dtype(str(model_cfg.dtype), device)
    return device, dtype, why


def local_resources() -> dict:
    """This machine's resources, as a cluster's are given to :func:`compute_on`."""
    import torch

    return {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count() if torch.cuda.is_available() else 0}


@dataclass(frozen=True)
class EmbedPlan:
    """The model side of an embedding pass: what each actor (or the local embedder) loads and runs,
    and the store of each readout. The run and the evaluation both build theirs with :func:`embed_plan`."""

    job: EngineJob
    stores: dict  # readout name -> FeatureStore
    model_fp: str
    dtype_reason: str
    num_actors: int
    actor_resources: dict  # an embedding actor's resources and memory, as the executor takes them


def embed_plan(cfg, model_dir: Path, model_hub: "hub.Resolved | None", readouts, saes, store_dir,
               resources: dict, model_fp: str | None = None) -> EmbedPlan:
    """Device, dtype, the engine job, its actors and the feature store of each readout, for
    ``cfg``'s ``model``, ``embed`` and ``render`` sections (a run's or the evaluation's)."""
    from ..features.local import stores_for

    device, dtype, why = compute_on(cfg.model, resources)
    model_fp = model_fp or model_fingerprint(model_dir, model_hub)
    n_actors = _num_actors(cfg.embed.num_actors, device, resources)
    custom = dict(cfg.embed.actor_resources)  # e.g. pin actors to a node type
    gpu = device.startswith("cuda")
    actor_resources = ({"num_gpus": 1, "num_cpus": cfg.embed.actor_num_cpus_gpu, "custom": custom} if gpu
                       else {"num_cpus": cfg.embed.actor_num_cpus_cpu, "custom": custom})
    threads = cfg.embed.torch_threads
    if threads in (None, "auto"):
        threads = 0 if gpu else max(1, (os.cpu_count() or 1) // max(1, n_actors))
    job = EngineJob(model_dir=str(model_dir), dtype=dtype, device=device, readouts=tuple(readouts),
                    saes=tuple(saes), batching=Batching.of(cfg.embed), torch_threads=int(threads),
                    trust_remote_code=bool(cfg.model.trust_remote_code),
                    attn_implementation=cfg.model.attn_implementation,
                    model_hub=model_hub.pinned if model_hub is not None else "")
    actor_resources["memory"] = engine_memory(job, cfg.render.max_length)  # a cluster schedules by it
    stores = stores_for(job, Rendering.of(cfg.render), model_fp, store_dir)
    return EmbedPlan(job, stores, model_fp, why, n_actors, actor_resources)


def check_tokenizer(cfg: RunConfig, model_dir: Path) -> None:
    """Render and tokenize one conversation on the driver before any task starts, so a
    rendering that cannot work with this model's tokenizer fails here, clearly."""
    from ..core.model import load_tokenizer

    tok = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    probe = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    try:
        rendered = render(probe, tok, cfg.render.mode, cfg.render.system_prompt)
        tokenize(rendered, tok, cfg.render.max_length, cfg.pool.exclude)
    except (InputError, ValueError) as e:
        hint = (" The tokenizer at model.path has no chat template (a base model, e.g. Meta-Llama-3-8B): "
                "set render.mode=plain." if cfg.render.mode == "chat_template" and not getattr(tok, "chat_template", None)
                else "")
        raise InputError(f"render.mode={cfg.render.mode!r} cannot render with the tokenizer of "
                         f"model.path={str(cfg.model.path)!r}: {e}.{hint}") from None
    except Exception as e:  # noqa: BLE001 - a template that raises on an ordinary conversation
        raise InputError(f"render.mode={cfg.render.mode!r}: the tokenizer of model.path={str(cfg.model.path)!r} "
                         f"failed on a plain two-turn conversation ({type(e).__name__}: {e}); "
                         "set render.mode=plain or fix the chat template") from None


# ----------------------------------------------------------------------------- the plan


def plan_units(cfg: RunConfig, inputs: Inputs, root: Path) -> dict[str, list[ReadUnit]]:
    """Each set's files split into row units (one indexing pass per file; compressed or
    JSON-array files staged under ``root/staged``: run under the folder's lease)."""
    units = {}
    for role in ("source", "target"):
        units[role] = readers.plan_units(inputs.files[role], cfg.embed.rows_per_unit, staging_dir=root / "staged")
        if not units[role]:
            raise InputError(f"the {role} set {getattr(cfg, role).paths} has no usable rows: its files are empty "
                             f"({', '.join(map(str, inputs.files[role]))})")
    return units


def make_plan(cfg: RunConfig, cfg_dict: dict, inputs: Inputs, units: dict[str, list[ReadUnit]], root: Path,
              run_id: str, resources: dict[str, float]) -> RunPlan:
    """The frozen plan of one attempt (``resources``: the cluster's, which decide the device
    and the number of embedding actors). Creates the store's folder (a run that embeds);
    writes nothing else."""
    device, dtype, dtype_reason = compute_on(cfg.model, resources)
    model_fp = model_fingerprint(inputs.model_dir, inputs.hub.get("model.path"))
    rendering = Rendering.of(cfg.render)
    render_spec = rendering.spec()
    prep_fp = _sha({"v": FINGERPRINT_VERSION, "model": model_fp, **render_spec, "exclude": cfg.pool.exclude})
    # RDS+: position-weighted mean hidden states, cosine, round-robin; select.rds_variant=published reads
    # hidden_states[-1] and interleaves as the authors' code does (targets in file order, a taken row spends the turn)
    rds_published = cfg.select.method == "rds" and cfg.select.rds_variant == "published"
    similarity, aggregate = cfg.select.similarity, cfg.select.aggregate
    readout = store = job = embed_fp = None
    width, n_actors, actor_resources = 0, 0, {}
    if cfg.select.method == "rds":
        readout = (rds_readout(num_layers(inputs.model_dir, cfg.model.trust_remote_code)) if rds_published
                   else Readout("hidden", parse_hookpoint(cfg.sae.hookpoint), "none", weighting="position"))
        similarity, aggregate = "cosine", "round_robin"
    elif cfg.select.method in MODEL_METHODS:
        readout = representation_readout(cfg.embed.representation, cfg.sae.hookpoint, cfg.pool.exclude, inputs.sae,
                                         cfg.embed.mlp_k)
    batching = Batching.of(cfg.embed)
    folders = {"run.output_dir": (root, publish.identity(root))}
    if readout is not None:  # a run that embeds: its store, its actors and what they run
        sae = inputs.sae if readout.kind == "sae" else None
        ep = embed_plan(cfg, inputs.model_dir, inputs.hub.get("model.path"), (readout,), (sae,) if sae else (),
                        cfg.embed.store_dir or str(root / "embeddings"), resources, model_fp)
        job, store, n_actors, actor_resources = ep.job, ep.stores[readout.name], ep.num_actors, ep.actor_resources
        embed_fp = store.root.name
        store.root.mkdir(parents=True, exist_ok=True)
        folders["the embedding store"] = (store.root, publish.identity(store.root))
        width = readout_width(readout, inputs.model_dir, inputs.sae, cfg.model.trust_remote_code)
    return RunPlan(
        cfg=cfg, cfg_dict=cfg_dict, root=root, run_id=run_id, out=root / publish.RUNS / run_id,
        model_dir=inputs.model_dir, sae=inputs.sae, hub=inputs.hub, versions=inputs.versions,
        model_hub=inputs.model_hub, units=units,
        device=device, dtype=dtype, dtype_reason=dtype_reason,
        rendering=rendering, model_fp=model_fp, prep_fp=prep_fp, embed_fp=embed_fp, readout=readout, width=width,
        similarity=similarity, aggregate=aggregate, rds_published=rds_published, batching=batching,
        prepared_dir=root / "prepared" / prep_fp, store=store, num_actors=n_actors, actor_resources=actor_resources,
        job=job, folders=folders)


def store_fingerprint(plan: RunPlan) -> dict:
    """What keys the embedding store (``<store>/fingerprint.json``): what a reader needs to trust its rows."""
    sae = plan.sae if plan.readout.kind == "sae" else None
    return {"model": str(plan.cfg.model.path), "model_fingerprint": plan.model_fp, "sae": asdict(sae) if sae else None,
            "readout": plan.readout.spec(), "readout_name": plan.readout.name, "render": plan.rendering.spec(),
            "dtype": plan.dtype, "value_dtype": plan.cfg.embed.value_dtype, "pad_multiple": plan.batching.pad_multiple,
            "sae_chunk_tokens": plan.batching.sae_chunk_tokens}


def begin(plan: RunPlan) -> None:
    """The attempt's folder, the store's fingerprint and a "running" manifest: the plan on disk."""
    plan.out.mkdir(parents=True, exist_ok=True)
    if plan.store is not None:
        write_json(store_fingerprint(plan), plan.store.root / "fingerprint.json")
    write_json({"status": "running", "run_id": plan.run_id, "config": plan.cfg_dict}, plan.out / "manifest.json")


def _use_gpu(device: str, resources: dict) -> bool:
    if device == "cuda":
        return True
    return device == "auto" and resources.get("GPU", 0) >= 1


def _num_actors(n, device: str, resources: dict) -> int:
    if n not in (None, "auto"):
        return int(n)
    return max(1, int(resources.get("GPU", 0))) if device.startswith("cuda") else 1


def _resolve_dtype(name: str, device: str) -> tuple[str, str]:
    """The compute dtype every actor uses (decided once, here) and why."""
    import torch

    from ..core.model import dtype_name, resolve_dtype_reason

    if name == "auto" and device.startswith("cuda") and not torch.cuda.is_available():
        # the driver has no GPU to ask; the actors' GPUs are assumed to be Ampere or newer
        return "bfloat16", "auto: CUDA actors (bf16 assumed: Ampere or newer; set model.dtype otherwise)"
    dt, why = resolve_dtype_reason(name, device)
    return dtype_name(dt), why
