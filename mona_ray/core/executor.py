"""Where the work runs: the one module of the job that talks to Ray.

The stages (``pipeline/stages.py``, ``features/local.py``) are plain functions and classes
over small dataclasses; this module runs them on a Ray cluster and hands their typed results back:

* :func:`start` / :func:`stop`: join ``ray.address`` / ``RAY_ADDRESS`` (checked to accept
  connections first: Ray alone retries an unreachable address for minutes) or start a fresh
  local instance, quietly;
* :func:`map_items`: one item per task (``fn(item, **kw)``, Ray Data) or per call of an actor
  pool (``cls(*args).method(item)``, with resources, declared memory, restarts and retries;
  nothing of the constructor in the object store); items and results are any picklable
  objects, moved as bytes or as task arguments (never as JSON text in a Ray row);
* :func:`map_tables`: an Arrow table per task, an Arrow table back (the score stage);
* :func:`call`: one remote function call with resources (explain's model pass);
* :func:`put`: a value shared by many tasks (resolved before the stage function sees it);
* :class:`Counter`: a tiny actor that tasks report progress to, fire and forget;
* :class:`Passes`: the baselines' multi-pass fan-out (``selectors/scale.py`` runs each
  baseline's ``*_parts.py`` through it), a bounded
  number of tasks in flight, state left in the object store between passes.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import socket
import sys
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator

import numpy as np


class ClusterUnreachable(RuntimeError):
    """The Ray cluster at the configured address does not answer."""


# ----------------------------------------------------------------------------- start and stop


class _QuietRay:
    """Drops Ray's lines that mean nothing to a user of this job: token authentication is on
    (Ray's default for the instance it starts: nothing to do), Ray Data's progress bars are off
    (the job draws its own, per stage, in rows and tokens), and Ray Data's abbreviated trace of a
    task's exception (the CLI says in one line what failed, or raises the exception whole)."""

    MUTED = ("Token authentication is enabled for this Ray cluster", "Progress bars disabled",
             "Exception occurred in user code", "An exception was raised from a task of operator")

    def filter(self, record) -> bool:
        return not any(m in str(record.msg) for m in self.MUTED)


def _quiet_ray_logs() -> None:
    import ray.data  # noqa: F401 - configures the "ray" and "ray.data" loggers and their handlers

    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _QuietRay) for f in handler.filters):
                handler.addFilter(_QuietRay())


_NODE_DEAD = re.compile(r"The node with node id: (\w+) and address: (\S+) .*has been marked dead", re.S)


_RETRIED = re.compile(r"Task (\S+) failed\. There are infinite retries remaining, so the task will be retried\. "
                      r"Error: (.*)", re.S)


def _handle_cluster_events() -> None:
    """Ray prints the cluster's error events on the driver as they come (``(raylet) ...``
    paragraphs). Those this job handles become one line of its own: a node lost (its actors
    restart elsewhere, their units are retried) and a call retried because its actor was lost
    (said once; nothing when the job itself ended the actor, closing its pool). Any other event
    is printed as Ray would."""
    from ray._private import worker

    ray_print = getattr(worker.print_to_stdstream, "__wrapped__", worker.print_to_stdstream)
    said = set()

    def say(msg: str) -> None:
        if msg not in said:
            said.add(msg)
            print(f"mona_ray: {msg}", file=sys.stderr, flush=True)

    def print_event(data, ignore_prefix):
        lines = []
        for line in data.get("lines", ()):
            raylet = data.get("pid") == "raylet"
            m = _NODE_DEAD.search(line) if raylet else None
            r = _RETRIED.search(line) if raylet else None
            if m:
                say(f"lost the Ray node {m.group(2)} ({m.group(1)[:12]}); its actors restart on other nodes and "
                    "redo the units they held")
            elif r:
                if "killed by `ray.kill`" not in r.group(2):  # the job closing its own actor pool
                    say("an actor was lost mid-call; Ray restarts it and retries the call")
            else:
                lines.append(line)
        if lines:
            ray_print({**data, "lines": lines}, ignore_prefix)

    print_event.__wrapped__ = ray_print
    worker.print_to_stdstream = print_event  # what the driver's error listener calls (worker logs keep their own)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with the address and the cause, when a ``host:port`` or ``ray://host:port``
    Ray address does not accept connections (``auto`` is left to Ray, which fails fast)."""
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e)).lower()
        raise ClusterUnreachable(f"cannot reach the Ray cluster at {address!r} ({why}). Start it (ray start --head) "
                                 "or set ray.address / RAY_ADDRESS to a running cluster's address") from None


def address_of(ray_cfg) -> str | None:
    """The cluster a run joins (the config's ``ray.address``, else ``RAY_ADDRESS``); None: a local instance."""
    return ray_cfg.address or os.environ.get("RAY_ADDRESS")


def start(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None,
          log_to_driver: bool = False) -> bool:
    """Join the Ray cluster at ``address`` or start a fresh local instance (``num_cpus``,
    ``num_gpus``); True when this call started Ray (the caller then :func:`stop`\\ s it). A Ray
    already initialised in this process (a notebook's) is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        _quiet_ray_logs()
        kw = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=log_to_driver,
                  logging_level=logging.WARNING)
        if address:
            check_reachable(address)
            try:
                ray.init(address=address, **kw)
            except (ConnectionError, TimeoutError) as e:
                raise ClusterUnreachable(f"cannot reach the Ray cluster at {address!r}: {str(e).splitlines()[0]}. "
                                         "Start it (ray start --head) or set ray.address / RAY_ADDRESS to a running "
                                         "cluster") from None
        else:
            # "local": always a fresh instance for this run, never a stray `ray start` cluster on this machine
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kw)
    finally:  # ray.init installs a native SIGTERM handler that aborts the driver; the CLI's own comes back
        if callable(on_term) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)
    _handle_cluster_events()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours are per stage, in rows and tokens
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return True


_open_iterators: weakref.WeakSet = weakref.WeakSet()


def _closing(it: Iterator) -> Iterator:
    """Ray Data's iterator, tracked until it ends: :func:`stop` closes one still open (a stage
    stopped by SIGTERM or an error) before Ray shuts down. Left to the garbage collector, its
    executor thread would report to a Ray already gone, print tracebacks and even start a new
    local instance."""
    gen = _drain(it)
    _open_iterators.add(gen)
    return gen


def _drain(it: Iterator) -> Iterator:
    try:
        yield from it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def stop(started: bool) -> None:
    for gen in list(_open_iterators):
        try:
            gen.close()
        except Exception:  # noqa: BLE001 - a stage already failing; its own error is the one to report
            pass
    if started:
        import ray

        ray.shutdown()


def resources() -> dict[str, float]:
    """The cluster's resources (``CPU``, ``GPU``, custom ones)."""
    import ray

    return dict(ray.cluster_resources())


# ----------------------------------------------------------------------------- shared values


class Shared:
    """A value put once into the object store and resolved inside each task (:func:`put`)."""

    def __init__(self, ref):
        self.ref = ref


def put(value) -> Shared:
    import ray

    return Shared(ray.put(value))


def _resolve(kw: dict) -> dict:
    import ray

    return {k: ray.get(v.ref) if isinstance(v, Shared) else v for k, v in kw.items()}


# ----------------------------------------------------------------------------- mapping


class _TaskCall:
    """Ray Data's per-batch function for :func:`map_items`' tasks: unpickle, call, pickle."""

    def __init__(self, fn: Callable, kw: dict):
        self.fn, self.kw = fn, kw

    def __call__(self, batch: dict) -> dict:
        kw = _resolve(self.kw)
        return {"result": np.array([pickle.dumps(self.fn(pickle.loads(b), **kw)) for b in batch["item"]], dtype=object)}


def _options(num_cpus: float, num_gpus: float, custom: dict | None, memory: int = 0) -> dict:
    """Ray's resource options for a task or an actor (``memory``: the bytes it is expected to
    use, which the cluster schedules by; 0: none declared)."""
    return {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {}),
            **({"resources": dict(custom)} if custom else {}), **({"memory": int(memory)} if memory else {})}


def map_items(items: list, fn: Callable | None = None, *, fn_kwargs: dict | None = None, num_cpus: float = 1.0,
              actor: tuple[type, tuple, str] | None = None, size: int = 1, num_gpus: float = 0,
              custom: dict | None = None, memory: int = 0) -> Iterator[Any]:
    """Each of ``items`` through ``fn(item, **fn_kwargs)`` in a task, or through
    ``actor = (cls, ctor_args, method)`` on a pool of ``size`` actors (each holding one
    ``cls(*ctor_args)``: a model, say; :func:`_actor_pool`); yields the results as they finish.
    ``memory``: the bytes one task or actor uses, declared to Ray. A lost node costs only its
    items in flight: its actors are restarted and their items retried."""
    import ray

    if not items:
        return iter(())
    res = _options(num_cpus, num_gpus, custom, memory)
    if actor is not None:
        return _closing(_actor_pool(items, actor, size, res))
    ds = ray.data.from_items([{"item": pickle.dumps(x)} for x in items], override_num_blocks=len(items))
    ds = ds.map_batches(_TaskCall(fn, dict(fn_kwargs or {})), batch_size=1, **res)
    return (pickle.loads(row["result"]) for row in _closing(ds.iter_rows()))


class _PoolActor:
    """One actor of :func:`_actor_pool`: built with no arguments, it makes its ``cls(*args)`` on
    its first call from the spec every call carries (a ref the driver holds), so a restarted
    actor (its node lost) rebuilds itself from the retried call."""

    def __init__(self):
        self.method = None

    def run(self, spec: list, item):
        if self.method is None:
            import ray

            cls, args, method = ray.get(spec[0])
            self.method = getattr(cls(*args), method)
        return self.method(item)


def _actor_pool(items: list, actor: tuple[type, tuple, str], size: int, res: dict, per_actor: int = 2) -> Iterator:
    """``items`` over ``size`` actors, ``per_actor`` in flight on each (one running, one queued).

    Actors restart without limit and their calls are retried (``max_restarts=-1``,
    ``max_task_retries=-1``), spread over the nodes. Their constructor takes nothing: what
    ``cls(*args)`` needs travels with each call as a ref the driver holds (put once), never as
    constructor arguments in the object store, which a restart could not get back
    (ray-project/ray#53727). The actors end with the iterator."""
    import ray

    spec = [ray.put(actor)]  # nested in a list: each call passes the ref, the actor resolves it once
    cls = ray.remote(max_restarts=-1, max_task_retries=-1, scheduling_strategy="SPREAD", **res)(_PoolActor)
    pool = [cls.remote() for _ in range(max(1, min(int(size), len(items))))]
    todo, pending = iter(items), {}
    try:
        for _ in range(per_actor):
            for a in pool:
                item = next(todo, _END)
                if item is not _END:
                    pending[a.run.remote(spec, item)] = a
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            a = pending.pop(done)
            item = next(todo, _END)
            if item is not _END:
                pending[a.run.remote(spec, item)] = a
            yield ray.get(done)
    finally:
        for a in pool:
            ray.kill(a)


_END = object()


class _TableCall:
    def __init__(self, fn: Callable, kw: dict):
        self.fn, self.kw = fn, kw

    def __call__(self, table):
        return self.fn(table, **_resolve(self.kw))


def map_tables(tables: list, fn: Callable, *, fn_kwargs: dict | None = None, num_cpus: float = 1.0) -> Iterator:
    """Each Arrow table of ``tables`` through ``fn(table, **fn_kwargs) -> table`` in a task;
    yields the result tables as they finish (the score stage: store parts in, scores out)."""
    import ray

    ds = ray.data.from_arrow(tables).map_batches(_TableCall(fn, dict(fn_kwargs or {})), batch_format="pyarrow",
                                                 batch_size=None, num_cpus=num_cpus)
    return _closing(ds.iter_batches(batch_format="pyarrow", batch_size=None))


class Pending:
    """A remote call's result, fetched by :meth:`result`."""

    def __init__(self, ref):
        self.ref = ref

    def result(self):
        import ray

        return ray.get(self.ref)


def call(fn: Callable, *args, num_cpus: float = 1.0, num_gpus: float = 0, custom: dict | None = None,
         memory: int = 0) -> Pending:
    """``fn(*args)`` in one remote task with these resources; returns at once."""
    import ray

    return Pending(ray.remote(**_options(num_cpus, num_gpus, custom, memory))(fn).remote(*args))


# ----------------------------------------------------------------------------- progress


class _CounterActor:
    def __init__(self):
        self.rows = 0
        self.tokens = 0

    def add(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens

    def get(self) -> tuple[int, int]:
        return self.rows, self.tokens


class Counter:
    """Rows and tokens reported by tasks or actors as they go (``report``: fire and forget),
    read by the driver (``get``); pickled into the tasks as a handle."""

    def __init__(self):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self._actor = ray.remote(num_cpus=0, scheduling_strategy=here)(_CounterActor).remote()  # dies with the driver only

    def report(self, rows: int, tokens: int) -> None:
        self._actor.add.remote(rows, tokens)

    def get(self, timeout: float = 10.0) -> tuple[int, int]:
        import ray

        return ray.get(self._actor.get.remote(), timeout=timeout)

    def close(self) -> None:
        import ray

        ray.kill(self._actor)


# ----------------------------------------------------------------------------- passes


class Passes:
    """Runs one function per part as Ray tasks, a bounded number in flight, with a bar per pass.

    ``info["passes"]`` gets one entry per pass: its name, task count, wall seconds, CPU
    seconds summed over its tasks and the largest array (in elements) in any result the
    driver fetched; ``info["largest_driver_array"]`` is the
    maximum over passes. The driver never fetches anything else from the tasks. With
    ``num_returns=2`` a task's second result stays in the object store (a :class:`Shared`
    handle) for a later pass to take as an argument."""

    def __init__(self, num_cpus: float, progress: bool, max_in_flight: int | None, info: dict):
        self.num_cpus, self.progress, self.info = float(num_cpus), progress, info
        if max_in_flight is None:
            cpus = float(resources().get("CPU", 1.0))
            max_in_flight = max(2, int(2 * cpus / max(self.num_cpus, 1e-3)))
        self.max_in_flight = int(max_in_flight)
        info.setdefault("passes", [])
        info.setdefault("largest_driver_array", 0)

    def run(self, name: str, fn: Callable, jobs: list[tuple], shared: tuple = (), num_returns: int = 1
            ) -> Iterable[tuple[int, Any]]:
        """Yield ``(i, result)`` per job ``(i, *args)`` as tasks finish; ``fn(*args, *shared)``.
        With ``num_returns=2`` only the first return is fetched; the result is ``(value, handle)``."""
        import ray
        from tqdm import tqdm

        remote = ray.remote(num_cpus=self.num_cpus, num_returns=num_returns)(_timed_call)
        shared = tuple(s.ref if isinstance(s, Shared) else ray.put(s) if isinstance(s, np.ndarray | dict | list | tuple)
                       else s for s in shared)
        entry = {"pass": name, "tasks": len(jobs), "largest_result_array": 0, "seconds": 0.0, "task_cpu_seconds": 0.0}
        self.info["passes"].append(entry)
        t0 = time.perf_counter()
        bar = tqdm(total=len(jobs), desc=f"{self.info.get('method', 'score')}: {name}", unit="part",
                   file=sys.stderr, disable=not self.progress, mininterval=1.0)
        todo, pending = iter(jobs), {}
        try:
            while True:
                while len(pending) < self.max_in_flight:
                    job = next(todo, None)
                    if job is None:
                        break
                    args = [a.ref if isinstance(a, Shared) else a for a in job[1:]]
                    refs = remote.remote(fn, num_returns, *args, *shared)
                    first, rest = (refs[0], Shared(refs[1])) if num_returns > 1 else (refs, None)
                    pending[first] = (job[0], rest)
                if not pending:
                    break
                done, _ = ray.wait(list(pending), num_returns=1)
                i, rest = pending.pop(done[0])
                cpu, value = ray.get(done[0])
                entry["task_cpu_seconds"] = round(entry["task_cpu_seconds"] + cpu, 3)
                n = _largest_array(value)
                entry["largest_result_array"] = max(entry["largest_result_array"], n)
                self.info["largest_driver_array"] = max(self.info["largest_driver_array"], n)
                bar.update(1)
                entry["seconds"] = round(time.perf_counter() - t0, 3)
                yield i, ((value, rest) if num_returns > 1 else value)
        finally:
            bar.close()


def _timed_call(fn: Callable, num_returns: int, *args):
    """``fn(*args)`` with its process CPU seconds: ``(cpu, result)`` (with two returns: on the first)."""
    c0 = time.process_time()
    out = fn(*args)
    cpu = time.process_time() - c0
    return ((cpu, out[0]), *out[1:]) if num_returns > 1 else (cpu, out)


def _largest_array(obj) -> int:
    import pyarrow as pa

    if isinstance(obj, np.ndarray | pa.Array | pa.ChunkedArray):
        return int(obj.size if isinstance(obj, np.ndarray) else len(obj))
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return max((_largest_array(o) for o in obj), default=0)
    return 0
