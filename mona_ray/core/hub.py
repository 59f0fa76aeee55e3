"""Hugging Face hub ids for the model, the SAE and the data, resolved to local files before any work.

Everything goes through ``huggingface_hub`` (its cache under ``HF_HOME``/``HF_HUB_CACHE``, its
file locks, ``HF_TOKEN``, ``HF_HUB_OFFLINE=1`` and ``HF_ENDPOINT``, all read by the library when
it is imported), and only the files a run needs are fetched:

- a model (:func:`resolve_model`): ``config.json``, ``generation_config.json``, the tokenizer
  files and the safetensors weights at the repository's root (with an index, only the shards it
  names); never pickles (``*.bin``, ``*.pt``, ...): a repository with only those is refused;
- an SAE (:func:`resolve_sae`): in a sparsify repository (one folder per hookpoint,
  ``layers.30/cfg.json`` + ``layers.30/sae.safetensors``) only the hooked layer's folder; in a
  SAELens repository (one folder per SAE, ``<sae id>/cfg.json`` + ``sae_weights.safetensors``)
  only the named SAE's two files;
- a dataset (:func:`resolve_dataset`): the data files (``.json`` arrays, ``.jsonl``,
  ``.jsonl.gz``, ``.json.gz``, ``.parquet``, ``.arrow``) of the repository, or of the given path
  or glob inside it; README and everything else stay on the hub.

What is a hub reference (:func:`is_hub_ref`):

- a local path that exists always wins;
- ``hf://datasets/<org>/<name>[@<revision>][/<path or glob>]`` is a dataset (the only hub form
  for ``source.paths``/``target.paths``); ``hf://<org>/<name>[@<revision>][/<folder>]`` a model
  or an SAE (``<folder>``: one SAE of a multi-SAE repository);
- for a model or an SAE, a bare ``<org>/<name>[@<revision>]``: exactly two segments of letters,
  digits, ``-``, ``_`` and ``.`` (the hub's repo-id rule), not starting with ``.`` or ``~``, and
  not ending in a file extension (``.json``, ``.safetensors``, ...). Anything else (``data/x.jsonl``,
  ``./model``, ``/abs/path``, one segment, three segments) is a local path, and a missing one gives
  the usual "not found" error.

``<revision>`` is a branch, a tag or a commit hash; the commit it resolves to comes back in
:class:`Resolved` (for the manifest and the fingerprints: a moved ``main`` re-embeds, a pinned
revision reproduces). A second resolution of the same revision downloads nothing (one metadata
call for a branch or tag, none for a commit hash); with ``HF_HUB_OFFLINE=1`` the cache alone is
used. A repository's file list comes from the cached listing (``trees/<commit>.json``, written by
this tool's and ``snapshot_download``'s fetches), else from the hub, else (offline or the hub
unreachable) from the files of the cached snapshot folder, as ``from_pretrained``,
``hf_hub_download``, an older ``huggingface_hub`` or a copy leave it (links into ``blobs/`` or
plain files; a ``@<commit>`` needs no ``refs/`` file): then what the run needs and the folder
lacks is "only partly in the cache". Every failure is a :class:`HubError` with a one-line message.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


class HubError(RuntimeError):
    """A hub reference that cannot be resolved; the message (one line) says why and what to do."""


@dataclass(frozen=True)
class Resolved:
    """A hub reference resolved to local files in the hub cache."""

    path: Path  # the local folder: the model's snapshot, the SAE's folder, the dataset's snapshot (or its sub-folder)
    repo_id: str
    revision: str  # as asked (``main`` when none was given)
    commit: str  # the commit hash it resolved to
    repo_type: str = "model"
    files: list[Path] = field(default_factory=list)  # the local files it is made of (datasets: the data files)
    pinned: str = ""  # the same reference at ``commit`` (what other nodes resolve, to get the very same files)
    listed: str = "listing"  # where its file list came from: the hub's ``listing`` (or its cached copy), or
    # the cached ``snapshot folder`` (a cache without a listing, read offline: only the files fetched so far)

    def manifest(self) -> dict:
        """What a run records about it."""
        return {"repo_id": self.repo_id, "repo_type": self.repo_type, "revision": self.revision,
                "commit": self.commit, "pinned": self.pinned, "listed": self.listed}


# ----------------------------------------------------------------------------- what is a hub reference

_SEGMENT = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_BARE_ID = re.compile(rf"({_SEGMENT}/{_SEGMENT})(?:@([^\s@]+))?")
_FILE_EXTENSIONS = (".json", ".jsonl", ".gz", ".parquet", ".arrow", ".csv", ".tsv", ".txt", ".safetensors",
                    ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".npz", ".npy", ".zip", ".tar", ".yaml",
                    ".yml", ".model", ".jinja")
_COMMIT = re.compile(r"[0-9a-f]{40}")
DATA_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".arrow")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model",
               "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
               "model.safetensors.index.json")
_SPARSIFY_WEIGHTS, _SAELENS_WEIGHTS = "sae.safetensors", "sae_weights.safetensors"


def is_hub_ref(s, kind: str = "model") -> bool:
    """Whether ``s`` names something on the hub rather than a local path (rule: module docstring).

    ``kind``: ``model`` or ``sae`` (``hf://`` or a bare ``org/name[@rev]``), ``dataset``
    (``hf://datasets/...`` only)."""
    s = str(s).strip()
    if s.startswith("hf://"):
        return s.startswith("hf://datasets/") == (kind == "dataset")
    if kind == "dataset" or Path(s).expanduser().exists():
        return False
    m = _BARE_ID.fullmatch(s)
    if not m or ".." in m.group(1) or "--" in m.group(1):
        return False
    return not m.group(1).lower().endswith(_FILE_EXTENSIONS)


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    repo_type: str  # model | dataset
    revision: str | None
    path_in_repo: str = ""
    text: str = ""  # as the user wrote it

    @property
    def label(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def at(self, commit: str) -> str:
        """This reference pinned to ``commit``, in the form it was written in."""
        if not self.text.startswith("hf://"):
            return f"{self.repo_id}@{commit}"
        return ("hf://" + ("datasets/" if self.repo_type == "dataset" else "") + f"{self.repo_id}@{commit}"
                + (f"/{self.path_in_repo}" if self.path_in_repo else ""))


def parse_ref(s: str, kind: str = "model", what: str = "path") -> HubRef:
    """``org/name[@rev]`` or ``hf://[datasets/]org/name[@rev][/path]`` -> :class:`HubRef`."""
    s = str(s).strip()
    if not is_hub_ref(s, kind):
        want = ("hf://datasets/<org>/<name>[@revision][/<path or glob>]" if kind == "dataset"
                else "<org>/<name>[@revision] or hf://<org>/<name>[@revision]")
        raise HubError(f"{what}={s!r}: not a hub reference (expected {want})")
    if not s.startswith("hf://"):
        m = _BARE_ID.fullmatch(s)
        return HubRef(m.group(1), "model", m.group(2), "", s)
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    try:
        uri = parse_hf_uri(s)
    except HfUriError as e:
        raise HubError(f"{what}={s!r}: {one_line(e)}") from None
    if uri.type not in ("model", "dataset"):
        raise HubError(f"{what}={s!r}: only model and dataset repositories are read (this is a {uri.type})")
    return HubRef(uri.id, uri.type, uri.revision, (uri.path_in_repo or "").strip("/"), s)


# ----------------------------------------------------------------------------- errors

def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _where(ref: HubRef) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{'datasets/' if ref.repo_type == 'dataset' else ''}{ref.repo_id}"


def _head(what: str, ref: HubRef) -> str:
    return f"{what}={(ref.text or ref.label)!r}"


def _translate(e: BaseException, what: str, ref: HubRef) -> HubError | None:
    """The one-line :class:`HubError` for a failure of ``huggingface_hub`` (None: not a hub failure)."""
    import httpx2
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (CachedRepoTreeNotFoundError, EntryNotFoundError, GatedRepoError,
                                        HfHubHTTPError, HFValidationError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError, RevisionResolutionError)

    rev = ref.revision or "main"
    token = bool(get_token())
    head = _head(what, ref)
    if isinstance(e, GatedRepoError):
        return HubError(f"{head}: {ref.repo_id} is a gated repository: accept its terms at {_where(ref)} and "
                        + ("use a token that has access (HF_TOKEN)" if token else "set HF_TOKEN (or run `hf auth login`)"))
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"{head}: no {ref.repo_type} repository {ref.repo_id!r} at {constants.ENDPOINT} "
                        + ("that your HF_TOKEN can read" if token
                           else "(if it is private or gated, set HF_TOKEN)")
                        + "; check the name, or point at a local path")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{head}: revision {rev!r} does not exist in {ref.repo_id} (use a branch, a tag or a "
                        "commit hash of that repository)")
    if isinstance(e, HFValidationError):
        return HubError(f"{head}: not a valid hub repository id or revision ({one_line(e, 160)})")
    unreachable = (OfflineModeIsEnabled, RevisionResolutionError, LocalEntryNotFoundError,
                   CachedRepoTreeNotFoundError, httpx2.TransportError)
    partly = isinstance(e, (IncompleteSnapshotError, _PartlyCached))
    if partly or isinstance(e, unreachable) or (isinstance(e, HfHubHTTPError) and e.response is not None
                                                and e.response.status_code >= 500):
        missing = "is only partly in the cache" if partly else "is not in the cache"
        detail = f": {e.detail}" if isinstance(e, _PartlyCached) else "" if partly else _cached_snapshots(ref)
        if _offline():
            return HubError(f"{head}: HF_HUB_OFFLINE=1 and {ref.repo_id}@{rev} {missing} ({constants.HF_HUB_CACHE})"
                            f"{detail}; run once with network access, or unset HF_HUB_OFFLINE")
        reason = "" if isinstance(e, _PartlyCached) else f" ({_root_reason(e)})"
        return HubError(f"{head}: cannot reach the hub at {constants.ENDPOINT}{reason} and {ref.repo_id}@{rev} "
                        f"{missing}{detail}; check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the "
                        "cache")
    if isinstance(e, EntryNotFoundError):
        return HubError(f"{head}: a file listed by the hub is missing from {ref.repo_id}@{rev} ({one_line(e, 160)})")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        if status == 401 and token:
            return HubError(f"{head}: the hub refused HF_TOKEN (invalid or expired); set a valid token or unset it")
        return HubError(f"{head}: the hub answered {status} for {ref.repo_id}@{rev}: {one_line(e, 200)}")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
        return HubError(f"{head}: cannot write the hub cache {constants.HF_HUB_CACHE} ({e.strerror}); "
                        "free space there or set HF_HOME to a writable folder")
    return None


def _cached_snapshots(ref: HubRef) -> str:
    """A hint naming the commits the cache holds for ``ref`` (when its revision is not among them)."""
    commits = sorted(p.name for p in _snapshot_dir(ref, "x").parent.glob("*") if _COMMIT.fullmatch(p.name))
    if not commits:
        return ""
    return (f"; it holds {', '.join(f'{ref.repo_id}@{c}' for c in commits[:2])}{', ...' if len(commits) > 2 else ''}"
            " (name that commit to use it)")


def _root_reason(e: BaseException) -> str:
    """The deepest cause of a connection failure, in a few words."""
    import httpx2

    seen = e
    while seen is not None:
        if isinstance(seen, httpx2.TransportError):
            return f"{type(seen).__name__}: {one_line(seen, 120)}"
        seen = seen.__cause__ or seen.__context__
    return one_line(e, 160)


class _Failures:
    """Turn ``huggingface_hub`` failures inside the block into :class:`HubError`."""

    def __init__(self, what: str, ref: HubRef):
        self.what, self.ref = what, ref

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if e is None or isinstance(e, HubError):
            return False
        err = _translate(e, self.what, self.ref)
        if err is None:
            return False
        raise err from None


# ----------------------------------------------------------------------------- the hub, through huggingface_hub

def _api():
    from huggingface_hub import HfApi

    return HfApi()


@dataclass(frozen=True)
class _Listing:
    """A revision resolved to its commit and ``{path: size}`` of its files. ``partial``: read from
    the local snapshot folder (a cache left by ``hf_hub_download``, ``from_pretrained`` or an older
    ``huggingface_hub``, which keep no listing), so it holds only the files fetched so far."""

    rev: object  # huggingface_hub.ResolvedRevision
    sizes: dict
    partial: bool = False


def _listing(ref: HubRef) -> _Listing:
    """The files at the resolved revision: from the cached listing (``trees/<commit>.json``) when
    there is one, else from the hub, else (offline, or the hub unreachable) from the files of the
    cached snapshot folder."""
    import httpx2
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, HfHubHTTPError
    from huggingface_hub.hf_api import RepoFile

    api = _api()
    rev = api.resolve_revision(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision)
    try:
        tree = get_cached_repo_tree(ref.repo_id, repo_type=ref.repo_type, revision=rev.resolved)
    except CachedRepoTreeNotFoundError as e:
        if not _offline():
            try:
                tree = api.list_repo_tree(ref.repo_id, repo_type=ref.repo_type, revision=rev.resolved,
                                          recursive=True)
                return _Listing(rev, {f.path: f.size for f in tree if isinstance(f, RepoFile)})
            except (httpx2.TransportError, HfHubHTTPError) as down:
                if isinstance(down, HfHubHTTPError) and (down.response is None or down.response.status_code < 500):
                    raise
                e = down
        local = _snapshot_files(_snapshot_dir(ref, rev.resolved))
        if not local:
            raise e
        return _Listing(rev, local, partial=True)
    return _Listing(rev, {f.path: f.size for f in tree if isinstance(f, RepoFile)})


def _snapshot_files(snap: Path) -> dict[str, int]:
    """``{path in the repository: size}`` of the files in a cached snapshot folder (symlinks into
    ``blobs/`` or plain copies; a link whose blob is gone is not a file)."""
    out = {}
    if snap.is_dir():
        for f in sorted(snap.rglob("*")):
            if f.is_file():
                out[f.relative_to(snap).as_posix()] = f.stat().st_size
    return out


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


class _PartlyCached(Exception):
    """What a resolution needs is not in a snapshot listed from its folder (``detail``: what is missing)."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def _need(listing: _Listing, ok: bool, detail: str) -> None:
    """A listing read from the snapshot folder that lacks what is needed: the files may just not be
    fetched yet, so say so rather than what the repository lacks."""
    if listing.partial and not ok:
        raise _PartlyCached(detail)


def _escape(path: str) -> str:
    """An exact repository path as an fnmatch pattern (``allow_patterns`` are patterns)."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _snapshot_dir(ref: HubRef, commit: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE).expanduser().resolve() / repo_folder_name(
        repo_id=ref.repo_id, repo_type=ref.repo_type) / "snapshots" / commit


def _fetch(ref: HubRef, listing: _Listing, files: list[str], quiet: bool = False, before: tuple = ()) -> Path:
    """Bring ``files`` of the resolved revision into the cache (only those not there yet); the
    snapshot folder. Says first, in one line, what it fetches and how much (sizes from the listing;
    ``before``: files this resolution already fetched quietly, counted in that line)."""
    from huggingface_hub import snapshot_download

    rev = listing.rev
    snap = _snapshot_dir(ref, rev.resolved)
    missing = [f for f in files if not (snap / f).is_file()]
    if not missing:
        return snap
    if _offline():  # (snapshot_download, offline and without a cached listing, returns the folder as it is)
        raise _PartlyCached(f"missing {_few(missing)}")
    if not quiet:
        print(f"[mona_ray] {fetch_line(ref, rev.resolved, list(before) + missing, listing.sizes)}", file=sys.stderr)
    out = snapshot_download(ref.repo_id, repo_type=ref.repo_type, revision=rev,
                            allow_patterns=[_escape(f) for f in missing])
    return Path(out)


def fetch_line(ref: HubRef, commit: str, files: list[str], sizes: dict) -> str:
    """``fetching <repo>@<commit>: N file(s), X MB (a, b, ...) from <endpoint> into <cache>``."""
    from huggingface_hub import constants

    known = [sizes[f] for f in files if sizes.get(f) is not None]
    size = sum(known)
    amount = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size} bytes"
    if len(known) < len(files):
        amount += f" + {len(files) - len(known)} of unknown size"
    kind = "dataset " if ref.repo_type == "dataset" else ""
    return (f"fetching {kind}{ref.repo_id}@{commit[:12]}: {len(files)} file(s), {amount} ({_few(files, 4)}) "
            f"from {constants.ENDPOINT} into {constants.HF_HUB_CACHE}")


def _resolved(ref: HubRef, listing: _Listing, path: Path, files: list[str]) -> Resolved:
    rev = listing.rev
    snap = _snapshot_dir(ref, rev.resolved)
    return Resolved(path=path, repo_id=ref.repo_id, revision=ref.revision or "main", commit=rev.resolved,
                    repo_type=ref.repo_type, files=[snap / f for f in files], pinned=ref.at(rev.resolved),
                    listed="snapshot folder" if listing.partial else "listing")


# ----------------------------------------------------------------------------- models

def model_files(paths) -> tuple[list[str], list[str]]:
    """Which root files of a model repository loading needs: ``(metadata and tokenizer files,
    safetensors weights)``; the weights are all root ``*.safetensors`` (refined by the index
    once it is local)."""
    root = [p for p in paths if "/" not in p]
    meta = [p for p in root if p in MODEL_FILES]
    weights = [p for p in root if p.endswith(".safetensors")]
    return meta, weights


def resolve_model(ref: str, what: str = "model.path") -> Resolved:
    """A model repository's config, tokenizer and safetensors weights, in the hub cache."""
    r = parse_ref(ref, "model", what)
    with _Failures(what, r):
        listing = _listing(r)
        sizes = listing.sizes
        meta, weights = model_files(sizes)
        _need(listing, "config.json" in meta, "missing config.json")
        _need(listing, bool(weights), "no *.safetensors weights among its cached files")
        if "config.json" not in meta:
            raise HubError(f"{_head(what, r)}: {r.repo_id} has no config.json at its root: not a transformers "
                           "checkpoint")
        if not weights:
            pickles = sorted(p for p in sizes if "/" not in p and p.endswith(_PICKLE_SUFFIXES))
            raise HubError(f"{_head(what, r)}: {r.repo_id} has no *.safetensors weights"
                           + (f", only pickled ones ({', '.join(pickles[:3])}), which mona_ray never loads"
                              if pickles else "") + "; use a safetensors revision or convert it locally")
        index, before = "model.safetensors.index.json", ()
        if index in meta:  # only the shards the index names (a repo may hold a consolidated copy too)
            before = () if (_snapshot_dir(r, listing.rev.resolved) / index).is_file() else (index,)
            named = sorted(set(json.loads((_fetch(r, listing, [index], quiet=True) / index).read_text())
                               .get("weight_map", {}).values()))
            absent = [w for w in named if w not in sizes]
            _need(listing, not absent, f"missing {_few(absent)}")
            weights = [w for w in weights if w in named] or weights
        files = meta + weights
        return _resolved(r, listing, _fetch(r, listing, [f for f in files if f not in before], before=before), files)


# ----------------------------------------------------------------------------- SAEs

def sae_folders(paths) -> dict[str, str]:
    """``{folder: format}`` of the SAEs in a repository listing (``""``: an SAE at the root)."""
    out = {}
    for p in paths:
        folder, _, name = p.rpartition("/")
        if name in (_SPARSIFY_WEIGHTS, _SAELENS_WEIGHTS) and (f"{folder}/cfg.json" if folder else "cfg.json") in paths:
            out[folder] = "sparsify" if name == _SPARSIFY_WEIGHTS else "saelens"
    return out


def _hookpoint_of(name: str) -> str | None:
    from .sae import SAEError, to_sparsify_hookpoint

    try:
        return to_sparsify_hookpoint(name.rpartition("/")[2])
    except SAEError:
        return None


def pick_sae(folders: dict[str, str], hookpoint: str | None, subfolder: str = "") -> list[str]:
    """The folders that may hold the SAE for ``hookpoint`` (by name; [] when none does)."""
    if subfolder:
        return [subfolder] if subfolder in folders else []
    if "" in folders:
        return [""]
    if not hookpoint:
        return sorted(folders) if len(folders) == 1 else []
    if hookpoint in folders:
        return [hookpoint]
    want = _hookpoint_of(hookpoint)
    return sorted(f for f in folders if want is not None and _hookpoint_of(f) == want)


def _cfg_hook(path: Path) -> str | None:
    raw = json.loads(path.read_text())
    return (raw.get("metadata") or {}).get("hook_name") or raw.get("hook_name") or raw.get("hook_point")


def resolve_sae(ref: str, hookpoint: str | None, what: str = "sae.path") -> Resolved:
    """Only the SAE for ``hookpoint`` from a sparsify or SAELens repository; ``path`` is its folder."""
    r = parse_ref(ref, "sae", what)
    with _Failures(what, r):
        listing = _listing(r)
        folders = sae_folders(listing.sizes)
        _need(listing, bool(folders), f"no SAE among its files (no cfg.json next to {_SPARSIFY_WEIGHTS} or "
                                      f"{_SAELENS_WEIGHTS})")
        if not folders:
            raise HubError(f"{_head(what, r)}: {r.repo_id} holds no SAE (no cfg.json next to {_SPARSIFY_WEIGHTS} "
                           f"or {_SAELENS_WEIGHTS})")
        chosen, before = pick_sae(folders, hookpoint, r.path_in_repo), ()
        if not chosen and not r.path_in_repo and "saelens" in folders.values() and _hookpoint_of(str(hookpoint)):
            # SAELens folders need not be named after their hook: read the (small) cfg.json files
            cfgs = sorted(f"{f}/cfg.json" for f, fmt in folders.items() if fmt == "saelens")
            snap = _snapshot_dir(r, listing.rev.resolved)
            before = tuple(c for c in cfgs if not (snap / c).is_file())  # announced with the weights
            _fetch(r, listing, cfgs, quiet=True)
            want = _hookpoint_of(str(hookpoint))
            chosen = [c.rpartition("/")[0] for c in cfgs
                      if (h := _cfg_hook(snap / c)) and _hookpoint_of(h) == want]
        if len(chosen) != 1:
            have = ", ".join(f or "(root)" for f in sorted(folders))
            if chosen:
                raise HubError(f"{_head(what, r)}: several SAEs in {r.repo_id} read {hookpoint}: "
                               f"{', '.join(chosen)}; name one: {what}=hf://{r.label}/<folder>")
            looked = f"folder {r.path_in_repo!r}" if r.path_in_repo else f"hookpoint {hookpoint!r}"
            _need(listing, False, f"no SAE for {looked} among the cached ones: {have}")
            raise HubError(f"{_head(what, r)}: no SAE for {looked} in {r.repo_id}; it has: {have}")
        folder = chosen[0]
        weights = _SPARSIFY_WEIGHTS if folders[folder] == "sparsify" else _SAELENS_WEIGHTS
        files = [f"{folder}/{n}" if folder else n for n in ("cfg.json", weights)]
        snap = _fetch(r, listing, files, before=before)
        return _resolved(r, listing, snap / folder if folder else snap, files)


# ----------------------------------------------------------------------------- datasets

_GLOB = re.compile(r"[*?\[]")


def data_files(paths, path_in_repo: str = "") -> list[str]:
    """The data files of a repository listing, only those at/under ``path_in_repo`` (a file, a
    folder or an fnmatch glob over repository paths) when given; sorted."""
    p = path_in_repo.strip("/")
    if not p:
        picked = list(paths)
    elif _GLOB.search(p):
        picked = [f for f in paths if fnmatch.fnmatchcase(f, p)]
    else:
        picked = [f for f in paths if f == p or f.startswith(p + "/")]
    return sorted(f for f in picked if f.lower().endswith(DATA_SUFFIXES))


def resolve_dataset(ref: str, what: str = "source.paths") -> Resolved:
    """``hf://datasets/<org>/<name>[@rev][/<path or glob>]``: its data files, in the hub cache."""
    r = parse_ref(ref, "dataset", what)
    with _Failures(what, r):
        listing = _listing(r)
        sizes = listing.sizes
        files = data_files(sizes, r.path_in_repo)
        where = f"{r.path_in_repo!r} in " if r.path_in_repo else ""
        _need(listing, bool(files), f"no data file in {where}its cached files")
        if not files:
            raise HubError(f"{_head(what, r)}: no data file ({', '.join(DATA_SUFFIXES)}) in {where}{r.label}; it "
                           f"has: {', '.join(sorted(sizes)[:8])}{', ...' if len(sizes) > 8 else ''}")
        if listing.partial:
            print(f"[mona_ray] {what}: {r.text or r.label} has no cached file listing; reading the {len(files)} "
                  f"data file(s) of its cached snapshot {listing.rev.resolved[:12]} (files never fetched are not "
                  "seen)", file=sys.stderr)
        snap = _fetch(r, listing, files)
        base = r.path_in_repo if r.path_in_repo and not _GLOB.search(r.path_in_repo) else ""
        path = snap / base if base and (snap / base).is_dir() else snap
        return _resolved(r, listing, path, files)


def here(path, pinned: str = "", kind: str = "model", hookpoint: str | None = None) -> str:
    """The local copy of a resolved hub reference on this node: ``path`` when it is here (a local
    run, a shared ``HF_HOME``), else the ``pinned`` reference (the same commit) fetched into this
    node's cache. ``pinned`` empty: a local path, returned as it is."""
    if not pinned or Path(path).exists():
        return str(path)
    r = resolve_sae(pinned, hookpoint) if kind == "sae" else resolve_model(pinned)
    return str(r.path)


def env_summary() -> dict:
    """The hub settings in effect (for the manifest; never the token itself)."""
    from huggingface_hub import constants, get_token

    return {"endpoint": constants.ENDPOINT, "cache": str(constants.HF_HUB_CACHE), "offline": _offline(),
            "token": bool(get_token())}
