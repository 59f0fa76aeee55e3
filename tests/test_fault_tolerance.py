"""A driver killed mid-embedding resumes to identical output; a lost node does not change the selection."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import tiny_overrides

HERE = Path(__file__).parent


def store_rows(out: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("embeddings/*/part-*.parquet"))


def settled(out: Path, quiet_s: float = 3.0, timeout: float = 60) -> int:
    """Rows in the store once nothing more is written: an actor of a killed driver lives until Ray
    notices its owner is gone (seconds on a loaded machine) and may finish the units it holds."""
    deadline = time.time() + timeout
    n, since = store_rows(out), time.time()
    while time.time() - since < quiet_s and time.time() < deadline:
        time.sleep(0.2)
        if (m := store_rows(out)) != n:
            n, since = m, time.time()
    return n


def start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "mona_ray.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


@pytest.fixture(scope="module")
def reference(tiny_lm, tiny_sae, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    p = subprocess.run([sys.executable, "-m", "mona_ray.run",
                        *tiny_overrides(tiny_lm, tiny_sae, tiny_data, out, "embed.rows_per_unit=4")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return out


def test_sigkill_mid_embedding_then_resume(reference, tiny_lm, tiny_sae, tiny_data, tmp_path):
    out = tmp_path / "out"
    args = tiny_overrides(tiny_lm, tiny_sae, tiny_data, out, "embed.rows_per_unit=4")
    proc = start(args)
    deadline = time.time() + 300
    while store_rows(out) < 12 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed:\n" + proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    done_before = settled(out)
    assert 12 <= done_before < 102
    assert not (out / "manifest.json").exists()  # nothing published yet; the attempt's own manifest says running
    (attempt,) = (out / "runs").iterdir()
    assert json.loads((attempt / "manifest.json").read_text())["status"] == "running"

    again = subprocess.run([sys.executable, "-m", "mona_ray.run", *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["counts"]["embedded_now"] == 102 - done_before  # only what was not finished
    for f in ("selected.jsonl", "selected.parquet", "scores.parquet"):
        assert (out / f).read_bytes() == (reference / f).read_bytes(), f


def test_worker_node_removed_mid_embedding(reference, tiny_lm, tiny_sae, tiny_data, tmp_path):
    out = tmp_path / "out"
    args = tiny_overrides(tiny_lm, tiny_sae, tiny_data, out, "embed.rows_per_unit=4", "embed.num_actors=2",
                          "+embed.actor_resources={embedder: 1}")
    p = subprocess.run([sys.executable, str(HERE / "node_failure_job.py"), str(out), json.dumps(args)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    tagged = [line for line in p.stdout.splitlines() if line.startswith("NODE_FAILURE_REPORT ")]
    assert len(tagged) == 1, p.stdout[-3000:]
    report = json.loads(tagged[0].split(" ", 1)[1])
    assert report["removed_node_while_rows_done"] < 102  # the node really went away mid-stage
    for f in ("selected.jsonl", "selected.parquet", "scores.parquet"):
        assert (out / f).read_bytes() == (reference / f).read_bytes(), f
