"""Inputs in object storage (issue 31, item 2), against a real S3-compatible server over HTTP.

moto's server runs on 127.0.0.1 in this process; the job reads it as it reads AWS: through
``pyarrow.fs`` with the credentials and endpoint in the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``). The runs are the real CLI in
a subprocess, as a user starts it, so that its Ray workers inherit that environment. Objects
are uploaded with boto3, as a user would.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto import server as moto_server

from conftest import tiny_overrides
from mona_ray.config import load_config, to_typed
from mona_ray.core import storage
from mona_ray.core.readers import input_files, plan_units, read_unit
from mona_ray.core.records import InputError
from mona_ray.pipeline.cli import run
from mona_ray.pipeline.plan import RunError, check

BUCKET = "mona-inputs"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port; ``s3.env``: the environment a client reads it with."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(k)
        for k, v in env.items():
            mp.setenv(k, v)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        client.env = env
        yield client
        storage._store.cache_clear()  # its filesystems point at this server
    server.stop()


def upload(s3, folder: Path, prefix: str) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{f.relative_to(folder)}", Body=f.read_bytes())


def cli(args, env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | env
    return subprocess.run([sys.executable, "-m", "mona_ray.run", *args], capture_output=True, text=True, timeout=600,
                          env=full)


def ok(p) -> None:
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.fixture(scope="module")
def inputs(tiny_data, tmp_path_factory):
    """Half the tiny pool as three files (Parquet in row groups, JSONL with one bad line, a JSON array) and
    the target as JSONL plus a gzip'd JSON array, in a local folder."""
    d = tmp_path_factory.mktemp("inputs")
    rows = pq.read_table(tiny_data["source"]).to_pylist()
    (d / "src" / "pool").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:15]), d / "src" / "a.parquet", row_group_size=4)
    lines = [json.dumps(r) for r in rows[15:30]]
    lines.insert(5, '{"id": "broken", "instruction": ')
    (d / "src" / "pool" / "b.jsonl").write_text("\n".join(lines) + "\n")
    (d / "src" / "pool" / "c.json").write_text(json.dumps(rows[30:45], indent=1))
    (d / "src" / "pool" / "notes.txt").write_text("not an input: a folder's other files are ignored\n")
    tgt = [json.loads(x) for x in tiny_data["target"].read_text().splitlines()]
    (d / "tgt").mkdir()
    (d / "tgt" / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tgt[:6]))
    (d / "tgt" / "t2.json.gz").write_bytes(gzip.compress(json.dumps(tgt[6:]).encode()))
    return d


def scores(out: Path) -> list[tuple[str, float]]:
    return sorted(zip(*pq.read_table(out / "scores.parquet").select(["id", "score"]).to_pydict().values()))


def selected(out: Path) -> list[str]:
    return [json.loads(x)["id"] for x in (out / "selected.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_run(ray_local, tiny_lm, tiny_sae, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    m = run(load_config(tiny_overrides(tiny_lm, tiny_sae, {"source": inputs / "src", "target": inputs / "tgt"}, out)),
            quiet=True)
    return out, m


@pytest.fixture(scope="module")
def uploaded(s3, inputs):
    upload(s3, inputs / "src", "pool-v1")
    upload(s3, inputs / "tgt", "target")


@pytest.fixture(scope="module")
def s3_run(s3, uploaded, tiny_lm, tiny_sae, tmp_path_factory):
    out = tmp_path_factory.mktemp("s3") / "out"
    data = {"source": f"s3://{BUCKET}/pool-v1/", "target": f"s3://{BUCKET}/target/t.jsonl,s3://{BUCKET}/target/*.gz"}
    args = tiny_overrides(tiny_lm, tiny_sae, data, out)
    p = cli(args, s3.env)
    ok(p)
    return out, json.loads((out / "manifest.json").read_text()), args


def test_objects_select_exactly_as_the_same_local_files(local_run, s3_run):
    (lout, lm), (out, m, _) = local_run, s3_run
    assert scores(out) == scores(lout) and len(scores(out)) == 45
    assert selected(out) == selected(lout)
    assert m["counts"]["source"] == lm["counts"]["source"] and m["counts"]["target"] == lm["counts"]["target"]
    rej = pq.read_table(out / "rejected.parquet").to_pylist()  # the bad line: named by URL and row
    assert [(r["file"], r["row"]) for r in rej] == [(f"s3://{BUCKET}/pool-v1/pool/b.jsonl", 5)]
    assert "malformed JSON" in rej[0]["reason"]
    files = Counter(pq.read_table(out / "scores.parquet").column("file").to_pylist())
    assert files == {f"s3://{BUCKET}/pool-v1/a.parquet": 15, f"s3://{BUCKET}/pool-v1/pool/b.jsonl": 15,
                     f"s3://{BUCKET}/pool-v1/pool/c.json": 15}


def test_the_manifest_records_each_object_and_nothing_plain_is_copied(s3, s3_run):
    out, m, _ = s3_run
    src = {o["url"].rpartition("/")[2]: o for o in m["objects"]["source"]}
    assert sorted(src) == ["a.parquet", "b.jsonl", "c.json"]
    head = s3.head_object(Bucket=BUCKET, Key="pool-v1/pool/c.json")
    assert src["c.json"]["etag"] == head["ETag"] and src["c.json"]["bytes"] == head["ContentLength"]
    assert src["c.json"]["modified"]
    assert [o["url"].rpartition("/")[2] for o in m["objects"]["target"]] == ["t.jsonl", "t2.json.gz"]
    staged = sorted(p.suffix for p in (out / "staged").iterdir() if not p.name.endswith(".ok"))
    assert staged == [".json"]  # only the gzip'd target was copied (decompressed); the rest is read in place


def test_a_changed_object_is_prepared_again_on_refresh(s3, s3_run):
    out, before, args = s3_run
    rows = json.loads(s3.get_object(Bucket=BUCKET, Key="pool-v1/pool/c.json")["Body"].read())
    rows[3]["output"] = "a new answer, uploaded over the old object"
    s3.put_object(Bucket=BUCKET, Key="pool-v1/pool/c.json", Body=json.dumps(rows).encode())
    p = cli([*args, "run.overwrite=true"], s3.env)
    ok(p)
    m = json.loads((out / "manifest.json").read_text())
    assert m["units"]["prepare"] == 1  # c.json's unit; the other objects' prepared parts are reused
    assert m["counts"]["embedded_now"] == 1  # the one changed row
    etag = {o["url"]: o["etag"] for o in m["objects"]["source"]}
    old = {o["url"]: o["etag"] for o in before["objects"]["source"]}
    changed = f"s3://{BUCKET}/pool-v1/pool/c.json"
    assert etag[changed] != old[changed] and {u: e for u, e in etag.items() if u != changed} == \
        {u: e for u, e in old.items() if u != changed}
    new, prev = dict(scores(out)), dict(scores(Path(before["run_dir"])))
    assert new[rows[3]["id"]] != prev[rows[3]["id"]]
    assert {k: v for k, v in new.items() if k != rows[3]["id"]} == {k: v for k, v in prev.items() if k != rows[3]["id"]}


def test_units_are_read_by_range_as_local_files_are(s3, inputs):
    """Planning and reading through the reader API: the same units and rows from s3:// as from the folder."""
    upload(s3, inputs / "src", "pool-units")
    local = plan_units(input_files([inputs / "src"]), 7)
    remote = plan_units(input_files([f"s3://{BUCKET}/pool-units"]), 7)
    assert [(u.start, u.stop, u.offset, u.end) for u in remote] == [(u.start, u.stop, u.offset, u.end) for u in local]
    assert all(u.path.startswith(f"s3://{BUCKET}/pool-units/") and u.read_path is None for u in remote)
    mid = remote[len(remote) // 2]  # one unit alone, read from its byte range
    assert [(r, str(x)) for r, x in read_unit(mid)] == [(r, str(x)) for r, x in read_unit(local[len(local) // 2])]
    assert [str(r) for u in remote for r in read_unit(u)] == [str(r) for u in local for r in read_unit(u)]
    assert input_files([f"s3://{BUCKET}/pool-units/**/*.json*"]) == [
        f"s3://{BUCKET}/pool-units/pool/b.jsonl", f"s3://{BUCKET}/pool-units/pool/c.json"]
    assert input_files([f"s3://{BUCKET}/pool-units/*.json*"]) == []  # one * stays within a folder


def test_other_fsspec_schemes_read_the_same(inputs):
    """Any scheme fsspec knows goes through the same seam (memory:// needs no server)."""
    import fsspec

    mem = fsspec.filesystem("memory")
    for f in (inputs / "src").rglob("*"):
        if f.is_file():
            mem.pipe(f"/mona-mem/{f.relative_to(inputs / 'src')}", f.read_bytes())
    local = [(r, str(x)) for u in plan_units(input_files([inputs / "src"]), 9) for r, x in read_unit(u)]
    remote = [(r, str(x)) for u in plan_units(input_files(["memory://mona-mem/"]), 9) for r, x in read_unit(u)]
    assert remote == local and len(local) == 46


@pytest.fixture
def check_with(tiny_lm, tiny_sae, tmp_path):
    """``check_with(source, **settings)``: :func:`check` of the tiny run with that source (config loaded once)."""
    import copy

    data = {"source": f"s3://{BUCKET}/pool-v1/", "target": f"s3://{BUCKET}/target/t.jsonl"}
    base = to_typed(load_config(tiny_overrides(tiny_lm, tiny_sae, data, tmp_path / "out")))

    def check_with(source, output_dir=None, store_dir=None):
        cfg = copy.deepcopy(base)
        cfg.source.paths = [source]
        cfg.run.output_dir = output_dir or cfg.run.output_dir
        cfg.embed.store_dir = store_dir
        return check(cfg)
    return check_with


def test_object_store_failures_are_one_line(s3, uploaded, check_with):
    """Checked before any work (the CLI prints each as ``mona_ray: error: <the line>``, exit 2)."""
    missing = f"s3://{BUCKET}/pool-v1/nope.parquet"
    with pytest.raises(InputError) as e:
        check_with(missing)
    assert str(e.value) == (f"source.paths: input {missing!r} does not exist; "
                            "set source.paths=[/path/to/files_or_folders or URLs]")
    cases = {
        "s3://no-such-bucket/x.jsonl": "input 's3://no-such-bucket/x.jsonl' ",
        "foo://bucket/x.jsonl": "input 'foo://bucket/x.jsonl': no filesystem reads foo:// URLs",
        f"s3://{BUCKET}/pool-v1/*.csv": "has no usable rows",
    }
    for url, want in cases.items():
        with pytest.raises(InputError) as e:
            check_with(url)
        assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
    import importlib.util

    if importlib.util.find_spec("ossfs") is None:
        with pytest.raises(InputError, match=r"input 'oss://b/x.jsonl': reading oss:// URLs needs the ossfs package: "
                                             r"pip install ossfs"):
            check_with("oss://b/x.jsonl")
    for setting in ("output_dir", "store_dir"):
        with pytest.raises(RunError, match=rf"^(run|embed).{setting}='s3://{BUCKET}/out': outputs and the embedding "
                                           "store are written to a POSIX filesystem") as e:
            check_with(f"s3://{BUCKET}/pool-v1/", **{setting: f"s3://{BUCKET}/out"})
        assert "\n" not in str(e.value)
