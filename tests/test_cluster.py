"""The cluster drill: a job submitted as users submit it, to a real multi-node Ray cluster.

A head and two worker nodes, each its own `ray start` process (own raylet and object store)
on 127.0.0.1; a custom resource (``embedder``) stands in for GPUs, so the embedding actors
run on the workers. The job goes in through ``launch/submit.sh`` (``ray job submit
--working-dir <repo> -- python -m mona_ray.run ...``), on a few hundred rows with the tests'
tiny model, and must end with the selection of a local run, byte for byte:

1. one worker node is SIGKILLed (its whole process group: raylet, object store, the actor)
   mid-embedding; the job finishes on the other;
2. ``ray job stop`` mid-embedding, then the same command again: it resumes, reusing every
   embedding the stopped job stored (the manifest's "reused from the store").

The job's output holds no Ray WARNING or ERROR line (e.g. core_worker's "constructor
arguments in the object store ... the actor restart will fail", Ray Data's "uses 1.2GiB of
memory per worker ... but Ray only requests 0.0B").
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _ray_nodes import Cluster
from _tiny_lm import make_rows, write_rows
from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "launch" / "submit.sh"
# enough embedding left after the first 16 rows (~40 s on 2 idle cores) for `ray job stop` or a node kill to
# land mid-embedding: at 300 rows an idle machine finished the pass before the stop arrived
ROWS = 1200
OUTPUTS = ("selected.jsonl", "selected.parquet", "scores.parquet")
# Ray's own log lines: Python logging ("... WARNING file.py:12 -- ..."), the C++ core
# ("[2026-01-01 00:00:00,000 E 123 456] core_worker.cc:..."), a worker's forwarded lines
RAY_NOISE = re.compile(r"\b(WARNING|ERROR)\b|^\[[\d\- :,]+ [WEF] \d+ \d+\]|\(raylet\)|core_worker\.cc|Traceback")


def store_rows(out: Path) -> int:
    n = 0
    for f in out.glob("embeddings/*/part-*.parquet"):
        try:
            n += pq.ParquetFile(f).metadata.num_rows
        except OSError:  # written and renamed this instant
            pass
    return n


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster_data")
    tgt = [{"id": f"t{i}", "instruction": r["instruction"], "input": "", "output": r["output"]}
           for i, r in enumerate(make_rows(12, seed=2))]
    (d / "target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tgt))
    return {"source": write_rows(d / "source.parquet", make_rows(ROWS, seed=1)), "target": d / "target.jsonl"}


def overrides(tiny_lm, tiny_sae, data, out: Path) -> list[str]:
    return tiny_overrides(tiny_lm, tiny_sae, data, out, "embed.rows_per_unit=4", "embed.num_actors=2",
                          "+embed.actor_resources={embedder: 1}", "embed.torch_threads=1")


@pytest.fixture(scope="module")
def reference(tiny_lm, tiny_sae, data, tmp_path_factory):
    """The same job run locally (its own Ray, one actor, no custom resource)."""
    out = tmp_path_factory.mktemp("local") / "out"
    args = [a for a in overrides(tiny_lm, tiny_sae, data, out) if "embedder" not in a and "num_actors" not in a]
    p = subprocess.run([sys.executable, "-m", "mona_ray.run", *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def cluster():
    if importlib.util.find_spec("aiohttp") is None:
        pytest.skip('the Ray Jobs API needs the dashboard: pip install -e ".[cluster]" (ray[default])')
    work = Path(tempfile.mkdtemp(prefix="mrc", dir="/tmp"))  # short: Ray's socket paths are length-limited
    # a killed node is declared dead after ~3 s instead of Ray's default ~30 s
    c = Cluster(work, {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
    try:
        c.start_head(num_cpus=2)
        c.workers = [c.add_worker(num_cpus=1, resources={"embedder": 2}, memory=4 << 30) for _ in range(2)]
        yield c
    finally:
        c.stop()


def submit(cluster, args: list[str], sid: str, wait: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """launch/submit.sh, as README and launch/README.md say (the base config: MONA_EXPERIMENT empty)."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "MONA_EXPERIMENT": "", "MONA_PYTHON": sys.executable,
           "MONA_SUBMISSION_ID": sid, **({} if wait else {"MONA_NO_WAIT": "1"})}
    return subprocess.run([str(SUBMIT), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=cluster.work)


def ray_job(cluster, *argv: str, timeout: float = 120) -> str:
    p = subprocess.run(["ray", "job", *argv, "--address", cluster.address], env=cluster.env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def wait_rows(cluster, sid: str, out: Path, at_least: int, timeout: float = 300) -> int:
    """Wait until the running job ``sid`` has stored ``at_least`` embedded rows."""
    deadline = time.time() + timeout
    while store_rows(out) < at_least:
        status = cluster.job(sid)["status"]
        assert status in ("PENDING", "RUNNING"), f"the job ended ({status}) before the drill could act on it"
        assert time.time() < deadline, f"{store_rows(out)} rows embedded after {timeout} s"
        time.sleep(0.2)
    return store_rows(out)


def actor_pids(node) -> set[int]:
    """The embedding actors' processes on ``node`` (Ray titles them ``ray::_PoolActor...``)."""
    out = set()
    for pid in node.pids():
        try:
            if b"ray::_PoolActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.add(pid)
        except OSError:
            pass
    return out


def assert_quiet(output: str) -> None:
    noise = [ln for ln in output.splitlines() if RAY_NOISE.search(ln)]
    assert not noise, "Ray warnings or errors in the job's output:\n" + "\n".join(noise[:20])


def assert_reference(out: Path, reference: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["counts"]["source"]["rows_in"] == ROWS
    for f in OUTPUTS:
        assert (out / f).read_bytes() == (reference / f).read_bytes(), f
    return m


@pytest.mark.cluster
def test_worker_node_killed_mid_embedding(cluster, reference, tiny_lm, tiny_sae, data):
    out = cluster.work / "killed"
    sid = "drill-kill"
    assert submit(cluster, overrides(tiny_lm, tiny_sae, data, out), sid, wait=False).returncode == 0
    done = wait_rows(cluster, sid, out, 16)
    actors_before = {w: actor_pids(w) for w in cluster.workers}
    assert sum(map(len, actors_before.values())) == 2, actors_before
    victim = next(w for w in cluster.workers if actors_before[w])  # a node that holds an embedding actor
    killed = victim.kill()  # raylet, object store, agents and every worker of the node at once
    assert done <= store_rows(out) < ROWS + 12  # mid-embedding
    deadline = time.time() + 600
    while (status := cluster.job(sid)["status"]) in ("PENDING", "RUNNING"):
        assert time.time() < deadline, status
        time.sleep(2)
    logs = ray_job(cluster, "logs", sid)
    assert status == "SUCCEEDED", logs[-3000:]
    m = assert_reference(out, reference)
    # the killed actor was restarted (a new process, off the dead node) and did the units it held
    restarted = {int(a.rsplit(":", 1)[1]) for a in m["embed_rows_per_actor"]} - set().union(*actors_before.values())
    assert restarted and not restarted & killed, (m["embed_rows_per_actor"], actors_before)
    assert_quiet(logs)


@pytest.mark.cluster
def test_ray_job_stop_then_resubmit_resumes(cluster, reference, tiny_lm, tiny_sae, data):
    out = cluster.work / "stopped"
    args = overrides(tiny_lm, tiny_sae, data, out)
    assert submit(cluster, args, "drill-stop", wait=False).returncode == 0
    wait_rows(cluster, "drill-stop", out, 16)
    ray_job(cluster, "stop", "drill-stop")  # SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S; waits
    assert cluster.job("drill-stop")["status"] == "STOPPED"
    assert "terminated (SIGTERM); run the same command again to resume" in ray_job(cluster, "logs", "drill-stop")
    time.sleep(1)
    stored = store_rows(out)
    assert 16 <= stored < ROWS + 12
    again = submit(cluster, args, "drill-resume")  # the same command: streams the job's output until it ends
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    m = assert_reference(out, reference)
    c = m["counts"]
    assert c["reused_from_store"] == stored and c["embedded_now"] == store_rows(out) - stored
    assert_quiet(again.stdout + again.stderr)


def test_a_lost_node_is_one_line_of_the_job_not_a_ray_error(capsys):
    """What Ray's driver prints when the cluster loses a node (a ``(raylet)`` paragraph) becomes
    one line of the job's own; any other cluster event is printed as Ray prints it."""
    from ray._private import worker

    from mona_ray.core import executor

    executor._handle_cluster_events()
    executor._handle_cluster_events()  # once is enough; twice wraps nothing twice
    dead = ("The node with node id: 0f3c9a1b2c3d4e5f and address: 10.0.0.7 and node name: 10.0.0.7 has been marked "
            "dead because the detector has missed too many heartbeats from it. This can happen when a \t(1) raylet "
            "crashes unexpectedly (OOM, etc.) \n\t(2) raylet has lagging heartbeats due to slow network or busy workload.")
    worker.print_to_stdstream({"lines": [dead, "some other cluster event"], "pid": "raylet", "is_err": False},
                              ignore_prefix=False)
    retried = ("Task _PoolActor.run failed. There are infinite retries remaining, so the task will be retried. Error: "
               "The actor is temporarily unavailable: RpcError: RPC error: Socket closed rpc_code: 14")
    closed = ("Task _PoolActor.run failed. There are infinite retries remaining, so the task will be retried. Error: "
              "The actor is dead because it was killed by `ray.kill`.")
    for lines in ([retried], [retried, closed], [closed]):  # the same event twice is said once
        worker.print_to_stdstream({"lines": lines, "pid": "raylet", "is_err": True}, ignore_prefix=False)
    out = capsys.readouterr()
    assert out.err.strip().splitlines() == [
        "mona_ray: lost the Ray node 10.0.0.7 (0f3c9a1b2c3d); its actors restart on other nodes and redo the units "
        "they held",
        "mona_ray: an actor was lost mid-call; Ray restarts it and retries the call"]
    assert "marked dead" not in out.out and "some other cluster event" in out.out and "_PoolActor" not in out.out
