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

import getpass
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from ..core.io import warn, write_text

RUNS, CURRENT, LOCK = "runs", "current", ".lock"
WORK = ("prepared", "staged", "embeddings")  # shared by the attempts; never published, never pruned here
RESERVED = {RUNS, CURRENT, LOCK, *WORK}


class OutputBusy(RuntimeError):
    """Another run holds the output folder's lease."""


# ----------------------------------------------------------------------------- the lease


class OutputLock:
    """The lease on one output folder: ``with OutputLock(root, ...):`` or ``acquire()`` / ``release()``."""

    def __init__(self, root: Path, run_id: str, stale_s: float = 300.0, heartbeat_s: float | None = None):
        self.path = Path(root) / LOCK
        self.run_id = run_id
        self.stale_s = float(stale_s)
        self.heartbeat_s = float(heartbeat_s if heartbeat_s is not None else max(1.0, min(30.0, self.stale_s / 5)))
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> dict:
        return {"token": self.token, "run": self.run_id, "owner": _user(), "host": socket.gethostname(),
                "pid": os.getpid(), "started": self._started, "heartbeat": time.time()}

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                why = self._stale(holder)
                if why is None:
                    raise OutputBusy(_busy_message(self.path.parent, holder)) from None
                if self._break(holder):
                    warn(f"broke the lease of {self.path.parent} ({why})")
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self._doc()) + "\n")
            self._thread = threading.Thread(target=self._beat, name="mona_ray-lease", daemon=True)
            self._thread.start()
            return self
        raise OutputBusy(f"run.output_dir={str(self.path.parent)!r}: could not take its lease {self.path} "
                         "(other runs keep taking it)")

    def _stale(self, holder: dict | None) -> str | None:
        """Why the holder's lease may be broken, or None while it is live."""
        now = time.time()
        if holder is None:  # being written this instant, or unreadable: judge by the file's age
            try:
                age = now - self.path.stat().st_mtime
            except FileNotFoundError:
                return "gone"
            return f"unreadable for {age:.0f} s" if age > self.stale_s else None
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} on this host is gone"
        age = now - float(holder.get("heartbeat", 0))
        return f"no heartbeat for {age:.0f} s > run.lock_stale_s={self.stale_s:g}" if age > self.stale_s else None

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

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held = _read(self.path)
            if held is None or held.get("token") != self.token:
                if not self.lost:
                    warn(f"the lease {self.path} was taken by another run; this run's output is not published")
                self.lost = True
                continue
            try:
                write_text(json.dumps(self._doc()) + "\n", self.path)
            except OSError as e:  # a full or read-only disk: the run itself will say so
                warn(f"cannot renew the lease {self.path}: {e}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = _read(self.path)
        if held is not None and held.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


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


def _busy_message(root: Path, holder: dict | None) -> str:
    if holder is None:
        return f"run.output_dir={str(root)!r} is being written by another run (its lease {root / LOCK} is being taken)"
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"run.output_dir={str(root)!r} is being written by another run: run {holder.get('run')} of "
            f"{holder.get('owner')} on {holder.get('host')} (pid {holder.get('pid')}, started {holder.get('started')}, "
            f"last heartbeat {age:.0f} s ago). Wait for it to finish; a lease without a heartbeat for "
            "run.lock_stale_s seconds is broken by the next run")


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
        if link.is_symlink() and link.name not in RESERVED and os.readlink(link).startswith(CURRENT + os.sep) \
                and link.name not in names:
            link.unlink(missing_ok=True)


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
