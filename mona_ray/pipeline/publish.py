"""One run per output folder, and a selection published in one atomic step.

The layout of ``run.output_dir``::

    .lock                       the lease of the run writing here (owner, host, pid, heartbeat)
    runs/<run id>/              one folder per attempt: every output file of that attempt
    current -> runs/<run id>    the published attempt: swapped in one rename when a run completes
    selected.jsonl -> current/selected.jsonl, manifest.json -> current/manifest.json, ...
                                stable names for readers (made once, they follow ``current``)
    prepared/ staged/ embeddings/
                                the work a later attempt reuses (content-addressed, checked)

A run writes only into its own ``runs/<run id>/``; readers of ``<output_dir>/selected.jsonl``
(or of ``current/``) see the previous complete selection until the new one is complete, then
the new one: never a missing or partial file. A failed or killed attempt leaves the published
selection as it was; the next attempt reuses its prepared and embedded parts.

The lease is a file created with ``O_EXCL`` (atomic on local disks and NFSv3+) and renewed by
a heartbeat thread. A second run on the same folder stops with one line naming the holder. A
lease is broken when its heartbeat is older than ``run.lock_stale_s`` (a holder on another
host that died), or at once when its holder ran on this host and its process is gone.
"""

from __future__ import annotations

import errno
import getpass
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from ..core.io import warn

RUNS, CURRENT, LOCK = "runs", "current", ".lock"
WORK = ("prepared", "staged", "embeddings")  # shared by the attempts; never published, never pruned here
RESERVED = {RUNS, CURRENT, LOCK, *WORK}
# what a run writes at the top of its folder: a regular file of one of these names is the old in-place
# layout's (written by an earlier version), replaced by the published link or removed when the run has none
OUTPUT_FILES = {"selected.jsonl", "selected.parquet", "scores.parquet", "rejected.parquet", "prototype.safetensors",
                "explain.md", "explain.json", "dataset_info.json", "selected.messages.jsonl", "manifest.json"}


class OutputBusy(RuntimeError):
    """Another run holds the output folder's lease."""


class PublishError(RuntimeError):
    """The output folder cannot hold published runs (no symbolic links there, or a name in the way)."""


# ----------------------------------------------------------------------------- the lease


class OutputLock:
    """The lease on one output folder: ``with OutputLock(root, ...):`` or ``acquire()`` / ``release()``.

    The lease file is created with ``O_EXCL`` and kept open; its heartbeat is its modification
    time, renewed through that open file (``os.utime``), so a renewal can only ever touch this
    run's own lease, never one another run created after breaking it. The lease is lost when
    the file at the path is no longer the one this run created (:meth:`check`)."""

    def __init__(self, root: Path, run_id: str, stale_s: float = 300.0, heartbeat_s: float | None = None,
                 wait_s: float = 0.0):
        self.path = Path(root) / LOCK
        self.run_id = run_id
        self.stale_s = float(stale_s)
        self.heartbeat_s = float(heartbeat_s if heartbeat_s is not None else max(1.0, min(30.0, self.stale_s / 5)))
        self.wait_s = float(wait_s)
        self.token = uuid.uuid4().hex
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> dict:
        return {"token": self.token, "run": self.run_id, "owner": _user(), "host": socket.gethostname(),
                "pid": os.getpid(), "boot": _boot_id(), "pidns": _pid_namespace(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        waited = False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                why = self._stale(holder)
                if why is not None:
                    if self._break(holder):
                        warn(f"broke the lease of {self.path.parent} ({why})")
                    continue
                if time.monotonic() >= deadline:
                    raise OutputBusy(_busy_message(self.path, holder, waited)) from None
                waited = True
                time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
                continue
            try:
                os.write(fd, (json.dumps(self._doc()) + "\n").encode())
                os.fsync(fd)
                st = os.fstat(fd)
            except BaseException as e:  # a full disk, or a signal: never leave an empty lease behind
                os.close(fd)
                self.path.unlink(missing_ok=True)
                if isinstance(e, OSError) and not e.filename:
                    raise OSError(e.errno, os.strerror(e.errno) if e.errno else str(e), str(self.path)) from e
                raise
            self._fd, self._ino = fd, (st.st_dev, st.st_ino)
            self._thread = threading.Thread(target=self._beat, name="mona_ray-lease", daemon=True)
            self._thread.start()
            return self

    def _stale(self, holder: dict | None) -> str | None:
        """Why the holder's lease may be broken, or None while it is live."""
        age = _age(self.path)
        if age is None:
            return "gone"
        if holder is not None and _same_machine(holder) and not _alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} on this host is gone"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s > run.lock_stale_s={self.stale_s:g}"
        return None

    def _break(self, holder: dict | None) -> bool:
        """Move the stale lease aside; if what was moved is not the lease judged stale (another
        run broke it and took a fresh one meanwhile), put that one back."""
        moved = self.path.with_name(f"{LOCK}.broken.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return False
        got = _read(moved)
        if holder is not None and got is not None and got.get("token") != holder.get("token"):
            try:
                os.link(moved, self.path)  # back, unless yet another run holds it now
            except FileExistsError:
                pass
            moved.unlink(missing_ok=True)
            return False
        moved.unlink(missing_ok=True)
        return True

    @property
    def lost(self) -> bool:
        """True when the lease at the path is not this run's any more (another run broke it)."""
        if self._ino is None:
            return True
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:  # a brief network-filesystem failure says nothing about the lease
            return False
        return (st.st_dev, st.st_ino) != self._ino

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self._fd)  # this run's own lease file, whatever the path now holds
            except OSError as e:  # a full or read-only disk: the run itself will say so
                warn(f"cannot renew the lease {self.path}: {e}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._fd is not None:
            if not self.lost:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _same_machine(holder: dict) -> bool:
    """The holder's pid means a process here: same host name, same boot and same pid namespace
    (containers on the host network share a host name, not their pids)."""
    return (holder.get("host") == socket.gethostname() and holder.get("boot") == _boot_id()
            and holder.get("pidns") == _pid_namespace())


def _read(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid())


def _busy_message(path: Path, holder: dict | None, waited: bool) -> str:
    root = path.parent
    if holder is None:
        return f"run.output_dir={str(root)!r} is being written by another run (its lease {path} is being taken)"
    age = _age(path) or 0.0
    return (f"run.output_dir={str(root)!r} is being written by another run: run {holder.get('run')} of "
            f"{holder.get('owner')} on {holder.get('host')} (pid {holder.get('pid')}, started {holder.get('started')}, "
            f"last heartbeat {age:.0f} s ago)" + (" after waiting run.lock_wait_s" if waited else "")
            + ". Wait for it to finish; a lease without a heartbeat for run.lock_stale_s seconds is broken "
            "by the next run")


# ----------------------------------------------------------------------------- attempts and publishing


def identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of a folder, or None when it is gone: the same path on another mount differs."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # ESTALE, ENOTCONN: a network mount that went away
        return (-1, e.errno or -1)
    return st.st_dev, st.st_ino


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def published(root: Path) -> Path | None:
    """The published attempt's folder, or None."""
    cur = Path(root) / CURRENT
    return cur.resolve() if cur.is_symlink() and cur.exists() else None


def published_manifest(root: Path) -> dict | None:
    """The manifest readers see at ``<root>/manifest.json`` (a published run, or a folder written
    by an older version in place), or None when there is none or it cannot be read."""
    doc = _read(Path(root) / "manifest.json")
    if doc is None and (Path(root) / "manifest.json").exists():
        warn(f"{Path(root) / 'manifest.json'} cannot be read; treated as no finished run")
    return doc


def check_layout(root: Path) -> None:
    """Before any work: the folder can publish (symbolic links work there; ``current`` and
    ``runs`` are what this layout makes of them, or absent)."""
    root = Path(root)
    cur, runs = root / CURRENT, root / RUNS
    if cur.exists() and not cur.is_symlink():
        raise PublishError(f"{cur} is not the link this layout publishes through (a folder or a file is in the way): "
                           "move it, or choose another run.output_dir")
    if runs.exists() and not runs.is_dir():
        raise PublishError(f"{runs} is a file; mona_ray keeps each run's outputs there: move it, or choose another "
                           "run.output_dir")
    probe = root / f".link-probe.{uuid.uuid4().hex[:8]}"
    try:
        os.symlink(RUNS, probe)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise PublishError(f"run.output_dir={str(root)!r} is on a filesystem without symbolic links ({e.strerror}); "
                               "a run is published by swapping one: choose a POSIX filesystem") from None
        raise OSError(e.errno, e.strerror, str(root)) from e  # a full or read-only disk: name the folder
    probe.unlink()


def publish(root: Path, attempt: Path) -> None:
    """Make ``attempt`` the published run: ``current`` swapped in one rename, then a stable link
    ``<root>/<name>`` for each of its files (links to ``current/<name>``; a file of the old
    in-place layout is replaced by its link atomically) and no link left to a file it lacks."""
    root, attempt = Path(root), Path(attempt)
    _swap_link(root / CURRENT, os.path.relpath(attempt, root))
    names = {p.name for p in attempt.iterdir() if not p.name.startswith(".")}
    for name in sorted(names - RESERVED):
        link = root / name
        target = os.path.join(CURRENT, name)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_dir() and not link.is_symlink():
            warn(f"{link} is a folder, so the published {name} is only at {root / CURRENT / name}")
            continue
        _swap_link(link, target)
    for link in root.iterdir():  # links left from a run with more files (e.g. explain turned off now)
        if link.name in names or link.name in RESERVED:
            continue
        if link.is_symlink() and os.readlink(link).startswith(CURRENT + os.sep):
            link.unlink(missing_ok=True)
        elif link.name in OUTPUT_FILES and link.is_file() and not link.is_symlink():
            link.unlink(missing_ok=True)  # the old in-place layout's file, which this run does not write


def _swap_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def prune(root: Path, keep: int, active: Path | None = None) -> list[str]:
    """Remove attempts other than the published one and ``active``: unfinished ones always (a
    later attempt redoes their cheap outputs; their prepared and embedded parts live outside
    them and stay), finished ones beyond the newest ``keep``. Returns what was removed."""
    runs = Path(root) / RUNS
    if not runs.is_dir():
        return []
    cur = published(root)
    keepers = {p for p in (cur, active) if p is not None}
    finished = []
    removed = []
    for d in sorted(runs.iterdir(), reverse=True):  # newest first (run ids start with the UTC time)
        if d.resolve() in keepers or not d.is_dir():
            continue
        status = (_read(d / "manifest.json") or {}).get("status")
        if status == "complete" and len(finished) + (cur is not None) < keep:
            finished.append(d)
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    return removed
