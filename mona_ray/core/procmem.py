"""The driver's measurements per stage: wall time (:class:`Stages`) and this process's memory, as Linux reports it (``/proc/self/status``); no-ops elsewhere.

``VmRSS`` (and its peak ``VmHWM``) counts three kinds of pages: private memory
(``RssAnon``), mapped files (``RssFile``) and shared memory (``RssShmem``). A Ray driver
maps Ray's object store (shared memory) and every object it reads zero-copy shows up in
its RSS as ``RssShmem``, although the store, not the driver, owns those pages. ``StageMemory``
therefore samples the three parts and reports each stage's peak of each, so a number
over a target can be attributed.
"""

from __future__ import annotations

import ctypes
import threading
import time
from contextlib import contextmanager

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def status_mb(*fields: str) -> dict[str, float]:
    """The named ``/proc/self/status`` fields in MB (missing ones left out)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in fields:
                    out[name] = int(rest.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def reset_peak() -> bool:
    """Reset ``VmHWM`` (``5 > /proc/self/clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Give freed heap back to the OS: Arrow's pool and glibc's arenas (``malloc_trim``).

    Without it, memory a stage freed stays in the process's RSS and the next stage's peak
    starts from there."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except ImportError:
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StageMemory:
    """Per-stage peaks of RSS and its parts, sampled by a thread every ``interval`` seconds
    (plus ``VmHWM``, which catches spikes between samples)::

        mem = StageMemory().start()
        ...; mem.mark("prepare")   # peaks since the previous mark
        mem.stop(); mem.stages     # {"prepare": {"rss": .., "anon": .., "shmem": .., "file": ..}}
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.stages: dict[str, dict[str, float]] = {}
        self._peak: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mona_ray-memory")

    def start(self) -> "StageMemory":
        reset_peak()
        self._thread.start()
        return self

    def _sample(self) -> None:
        now = status_mb(*FIELDS)
        with self._lock:
            for k, v in now.items():
                self._peak[k] = max(self._peak.get(k, 0.0), v)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def mark(self, stage: str) -> None:
        self._sample()
        hwm = status_mb("VmHWM").get("VmHWM")
        with self._lock:
            p, self._peak = self._peak, {}
        if not p:
            return
        rec = {"rss": round(max(p.get("VmRSS", 0.0), hwm or 0.0), 1), "anon": round(p.get("RssAnon", 0.0), 1),
               "shmem": round(p.get("RssShmem", 0.0), 1), "file": round(p.get("RssFile", 0.0), 1)}
        self.stages[stage] = rec
        release_free_memory()
        reset_peak()

    def stop(self) -> None:
        self._stop.set()

    def peak(self, part: str = "rss") -> float | None:
        vals = [s[part] for s in self.stages.values() if part in s]
        return max(vals) if vals else None


class Stages:
    """Accumulates wall time per named stage: ``with stages("score"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def __getitem__(self, name: str) -> float:
        return self.seconds.get(name, 0.0)
