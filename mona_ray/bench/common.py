"""What every benchmark shares: peak memory, stage timers, the machine, table and JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path

from ..core import procmem
from ..core.procmem import Stages  # noqa: F401 - the driver's per-stage clock, for the benchmarks too
from ..core.io import write_text

DEFAULT_OUT_DIR = Path("outputs") / "bench"


class BenchError(ValueError):
    """A bad flag or an impossible setting; printed as one line, no traceback."""


def check_positive(args, names, within: tuple[str, str] | None = None, ratio: str | None = "ratio") -> None:
    """The flags every benchmark checks alike: ``names`` positive; ``within = (small, large)``:
    --small no larger than --large; ``ratio``: in (0, 1]."""
    flag = lambda n: "--" + n.replace("_", "-")  # noqa: E731
    for name in names:
        if getattr(args, name) < 1:
            raise BenchError(f"{flag(name)}={getattr(args, name)} must be positive")
    if within and getattr(args, within[0]) > getattr(args, within[1]):
        raise BenchError(f"{flag(within[0])}={getattr(args, within[0])} exceeds {flag(within[1])}={getattr(args, within[1])}")
    if ratio and not 0 < getattr(args, ratio) <= 1:
        raise BenchError(f"{flag(ratio)}={getattr(args, ratio)} must be in (0, 1]")


# ----------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS; False if unsupported (``procmem.reset_peak``)."""
    return procmem.reset_peak()


def status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``...) in MB; None if unavailable."""
    return procmem.status_mb(field).get(field)


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (VmHWM), else since the process started."""
    hwm = status_mb("VmHWM")
    if hwm is not None:
        return hwm
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


# ----------------------------------------------------------------------------- timing


class CpuMeter:
    """CPU seconds used by this process and all its descendants (e.g. a local Ray cluster).

    A background thread polls every ``interval`` s and keeps each process's latest CPU time,
    so a child that exits between two polls loses at most one interval of its CPU time.
    CPU time, unlike wall time, barely moves when other jobs share the machine. The same
    polls keep each descendant's largest RSS seen (``child_peak_rss_mb``: the largest of them,
    e.g. an embedding actor's; sampled, so a peak shorter than ``interval`` can be missed).
    """

    def __init__(self, interval: float = 0.5):
        import threading

        self.interval = interval
        self._seen: dict[tuple[int, float], float] = {}
        self._rss: dict[tuple[int, float], tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                key = (p.pid, p.create_time())
                t = p.cpu_times()
                self._seen[key] = t.user + t.system
                if p.pid != me.pid:
                    rss = p.memory_info().rss
                    if rss > self._rss.get(key, ("", 0))[1]:
                        self._rss[key] = (" ".join(p.cmdline()[:3])[:120], rss)
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> "CpuMeter":
        self._poll()
        self._base = dict(self._seen)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self.seconds = sum(v - self._base.get(k, 0.0) for k, v in self._seen.items())
        peaks = sorted(self._rss.values(), key=lambda x: -x[1])
        self.child_peak_rss_mb = peaks[0][1] / 2**20 if peaks else None
        self.child_peaks = [{"process": name, "peak_rss_mb": round(b / 2**20, 1)} for name, b in peaks[:6]]


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import numpy
    import torch

    info = {
        "cpu": cpu_model(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------- output


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, header) pairs."""
    cells = [[h for _, h in columns]] + [[fmt(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(name: str, report: dict, out: str | None, argv: list[str]) -> Path:
    path = Path(out) if out else DEFAULT_OUT_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": name, "command": "python -m mona_ray.bench " + " ".join(argv),
            "machine": machine_info(), **report}
    write_text(json.dumps(body, indent=2, default=float) + "\n", path)
    return path
