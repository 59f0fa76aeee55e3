"""A whole run started with hub ids (model.path, sae.path, source.paths), against the loopback
stand-in for the hub (tests/_hub_server.py), then again offline from the filled cache.

The command is the product's own (``python -m mona_ray.run``) in a fresh process with
``HF_HOME``/``HF_ENDPOINT`` in its environment, as a user's run would have them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _hub_server import HubServer, Repo, folder_files
from _tiny_lm import make_rows, make_tiny_lm
from conftest import make_random_sae, tiny_overrides

LLAMA, SAE, DATA = "tiny/llama", "tiny/sae", "tiny/data"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub_run")
    lm = make_tiny_lm(tmp / "lm", layers=4, hidden=32)
    sae = tmp / "sae"
    for layer in range(4):  # one folder per layer, as EleutherAI's SAE repositories are laid out
        make_random_sae(sae, d_in=32, latents=128, k=8, hookpoint=f"layers.{layer}", seed=layer)
    rows = make_rows(60, seed=1)
    source = tmp / "source.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = tmp / "target.jsonl"
    target.write_text("".join(json.dumps({**r, "id": f"t{i}"}) + "\n" for i, r in enumerate(make_rows(8, seed=2))))
    with HubServer() as server:
        server.llama = server.add(Repo(LLAMA))
        server.llama_v1 = server.llama.commit({**folder_files(lm), "README.md": b"# tiny llama\n"})
        server.sae_v1 = server.add(Repo(SAE)).commit({**folder_files(sae), "README.md": b"#\n"}, "main", "v1.0")
        server.data = server.add(Repo(DATA, repo_type="dataset")).commit(
            {"data/train.jsonl": source.read_bytes(), "README.md": b"# tiny data\n"})
        server.local = {"lm": lm, "sae": sae, "source": source, "target": target}
        yield server


def run(args: list[str], home: Path, endpoint: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "mona_ray.run", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def ok(p) -> None:
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout[-3000:] + p.stderr[-3000:]


def selection(out: Path) -> list[tuple[str, float]]:
    return [(r["id"], round(r["score"], 6)) for r in map(json.loads, (out / "selected.jsonl").read_text().splitlines())]


def test_a_run_from_hub_ids_fetches_only_what_it_needs_then_runs_offline(hub, tmp_path):
    home, loc = tmp_path / "hf_home", hub.local
    data = {"source": f"hf://datasets/{DATA}", "target": loc["target"]}
    args = tiny_overrides(LLAMA, f"{SAE}@v1.0", data, tmp_path / "out", "report.explain=false")
    mark = hub.mark()
    p = run(args, home, hub.url)
    ok(p)
    lines = [x for x in p.stderr.splitlines() if x.startswith("[mona_ray] fetching")]  # one line per repository
    assert [x.split(":")[0] for x in lines] == [f"[mona_ray] fetching {r}@{c[:12]}" for r, c in (
        (LLAMA, hub.llama_v1), (SAE, hub.sae_v1), (f"dataset {DATA}", hub.data))], lines
    need = {f: len(b) for f, b in hub.llama.commits[hub.llama_v1].items() if f != "README.md"}
    assert f": {len(need)} file(s), {sum(need.values()) / 1e6:.1f} MB (" in lines[0], lines[0]
    assert lines[1].startswith(f"[mona_ray] fetching {SAE}@{hub.sae_v1[:12]}: 2 file(s), ") and "layers.2/cfg.json" in lines[1]
    fetched = hub.fetched(mark)
    sae_files = sorted(f for f in fetched if f.startswith(SAE + ":"))
    assert sae_files == [f"{SAE}:layers.2/cfg.json", f"{SAE}:layers.2/sae.safetensors"], sae_files  # one layer of four
    assert f"{DATA}:data/train.jsonl" in fetched and not any(f.endswith("README.md") for f in fetched), fetched
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["hub"]["sae.path"]["commit"] == hub.sae_v1 and m["hub"]["sae.path"]["revision"] == "v1.0"
    assert m["hub"]["source.paths"][0]["commit"] == hub.data and m["hub"]["model.path"]["repo_id"] == LLAMA
    assert m["sae"]["hub"] == f"{SAE}@{hub.sae_v1}"  # what a node without the driver's cache fetches

    # the same files from local paths select the same rows with the same scores
    local = tiny_overrides(loc["lm"], loc["sae"], {"source": loc["source"], "target": loc["target"]},
                           tmp_path / "local", "report.explain=false")
    ok(run(local, home, hub.url))
    assert selection(tmp_path / "out") == selection(tmp_path / "local") and len(selection(tmp_path / "out")) == 10

    # offline, from the filled cache: nothing is requested, the same selection comes back
    mark = hub.mark()
    again = run(args + ["run.overwrite=true"], home, hub.url, offline=True)
    ok(again)
    assert hub.requests(mark) == []
    assert selection(tmp_path / "out") == selection(tmp_path / "local")
    m1 = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m1["counts"]["embedded_now"] == 0 and m1["fingerprints"] == m["fingerprints"]

    # main moves (a new commit): the embeddings are keyed by the commit, so the run embeds again ...
    moved = hub.llama.commit({**hub.llama.commits[hub.llama_v1], "README.md": b"# tiny llama, v2\n"})
    ok(run(args + ["run.overwrite=true"], home, hub.url))
    m2 = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m2["hub"]["model.path"]["commit"] == moved and m2["fingerprints"]["model"] != m["fingerprints"]["model"]
    assert m2["counts"]["embedded_now"] == m["counts"]["embedded_now"] > 0  # every row again, as the first run did
    # ... and a revision pinned to the first commit reproduces the first run, from the store
    pinned = [a.replace(f"model.path={LLAMA}", f"model.path={LLAMA}@{hub.llama_v1}") for a in args]
    ok(run(pinned + ["run.overwrite=true"], home, hub.url))
    m3 = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m3["fingerprints"] == m["fingerprints"] and m3["counts"]["embedded_now"] == 0
    assert selection(tmp_path / "out") == selection(tmp_path / "local")


def test_hub_failures_are_one_line(hub, tmp_path):
    loc = hub.local
    data = {"source": loc["source"], "target": loc["target"]}
    p = run(tiny_overrides("tiny/missing", loc["sae"], data, tmp_path / "out"), tmp_path / "home", hub.url)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("mona_ray: error:")]
    assert "model.path='tiny/missing'" in line, line
    args = [a.replace("sae.hookpoint=layers.2", "sae.hookpoint=layers.7") for a in tiny_overrides(LLAMA, SAE, data,
                                                                                                 tmp_path / "out")]
    p = run(args, tmp_path / "home", hub.url)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("mona_ray: error:")]
    assert "layers.7" in line and "layers.0" in line and "layers.3" in line, line  # the hookpoints it has
    assert not (tmp_path / "out").exists()  # nothing written before the inputs resolve


def hf_env(home: Path, endpoint: str, offline: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def python(code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


def test_offline_runs_from_caches_other_tools_left(hub, tmp_path):
    """The cache as transformers' from_pretrained, sparsify (snapshot_download of one layer, with an older
    huggingface_hub: no trees/ listing) and hf_hub_download leave it; then offline, against no hub at all:
    the run resolves all three from the snapshot folders and records their commits. A copy of that cache
    (plain files, no refs: every id pinned to its commit) runs through mona_ray.select."""
    import shutil

    home, loc = tmp_path / "hf_home", hub.local
    fill = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
from huggingface_hub import hf_hub_download, snapshot_download
AutoTokenizer.from_pretrained({LLAMA!r}); AutoModelForCausalLM.from_pretrained({LLAMA!r})
snapshot_download({SAE!r}, revision="v1.0", allow_patterns=["layers.2/*"])
hf_hub_download({DATA!r}, "data/train.jsonl", repo_type="dataset")
"""
    p = python(fill, hf_env(home, hub.url))
    assert p.returncode == 0, p.stderr[-3000:]
    for trees in (home / "hub").glob("*/trees"):
        shutil.rmtree(trees)
    down = "http://127.0.0.1:9"  # nothing listens there: a request would fail the run
    args = tiny_overrides(LLAMA, f"{SAE}@v1.0", {"source": f"hf://datasets/{DATA}", "target": loc["target"]},
                          tmp_path / "out", "report.explain=false")
    mark = hub.mark()
    p = run(args, home, down, offline=True)
    ok(p)
    assert hub.requests(mark) == []
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["hub"]["model.path"]["commit"] == hub.llama.refs["main"] and m["hub"]["model.path"]["revision"] == "main"
    assert m["hub"]["sae.path"]["commit"] == hub.sae_v1 and m["hub"]["sae.path"]["revision"] == "v1.0"
    assert m["hub"]["source.paths"][0]["commit"] == hub.data
    assert {m["hub"]["model.path"]["listed"], m["hub"]["sae.path"]["listed"]} == {"snapshot folder"}
    assert "has no cached file listing; reading the 1 data file(s) of its cached snapshot" in p.stderr
    local = tiny_overrides(loc["lm"], loc["sae"], {"source": loc["source"], "target": loc["target"]},
                           tmp_path / "local", "report.explain=false")
    ok(run(local, home, down, offline=True))
    assert selection(tmp_path / "out") == selection(tmp_path / "local") and len(selection(tmp_path / "out")) == 10

    copy = tmp_path / "copied"
    shutil.copytree(home / "hub", copy / "hub", symlinks=False, ignore=shutil.ignore_patterns("blobs", "refs", ".locks"))
    model = f"{LLAMA}@{hub.llama.refs['main']}"
    select = """
import json, sys
import mona_ray
args = json.loads(sys.argv[1])
s = mona_ray.select(args["source"], args["target"], overrides=args["overrides"], output_dir=args["out"])
print(json.dumps({"ids": s.selected.column("id").to_pylist(), "hub": s.manifest["hub"]}))
"""
    over = [a for a in args if not a.startswith(("model.path=", "sae.path=", "source.paths=", "target.paths=",
                                                 "run.output_dir="))]
    req = {"source": f"hf://datasets/{DATA}@{hub.data}", "target": str(loc["target"]), "out": str(tmp_path / "sel"),
           "overrides": over + [f"model.path={model}", f"sae.path={SAE}@{hub.sae_v1}"]}
    p = python(select, hf_env(copy, down, offline=True), json.dumps(req))
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["ids"] == [i for i, _ in selection(tmp_path / "local")]
    assert got["hub"]["model.path"]["commit"] == hub.llama.refs["main"] and got["hub"]["model.path"]["pinned"] == model


def test_the_evaluation_reads_hub_ids_as_the_run_does(hub, tmp_path):
    """python -m mona_ray.evaluate with model.path and sae.path hub ids: the same code as the run
    resolves them (only the hooked layers are fetched) and the scores equal the local folders'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    loc = hub.local
    rows = [json.loads(x) for x in loc["source"].read_text().splitlines()]
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "domain": "a" if i % 2 else "b"} for i, r in enumerate(rows)]), pool)
    (tmp_path / "relevance.json").write_text(json.dumps({"t": ["a"]}))
    common = [f"data.pool={pool}", f"data.targets={{t: {loc['target']}}}", f"data.relevance={tmp_path / 'relevance.json'}",
              "model.dtype=float32", "sae.hookpoint=layers.2", "render.max_length=64", "selectors=[mona]",
              "mona.representations=[sae]", "mona.poolings=[mean]", "mona.similarities=[jaccard]",
              "mona.excludes=[special]", "mona.hookpoints=[layers.1,layers.2]", "mona.ks=[]", "mona.aggregations=[]",
              "mona.rds=false", "progress=false", "k=[5]", "figure4.latents=8", "embed.rows_per_unit=32"]

    def evaluate(out: str, model, sae, home: Path, store: str):
        p = subprocess.run([sys.executable, "-m", "mona_ray.evaluate", *common, f"output_dir={tmp_path / out}",
                            f"model.path={model}", f"sae.path={sae}", f"embed.store_dir={tmp_path / store}"],
                           env=hf_env(home, hub.url), capture_output=True, text=True, timeout=600)
        ok(p)
        return pq.read_table(tmp_path / out / "scores.parquet").to_pydict(), json.loads(
            (tmp_path / out / "results.json").read_text())

    mark = hub.mark()
    from_hub, doc = evaluate("hub", LLAMA, SAE, tmp_path / "home", "store_hub")
    assert sorted(f for f in hub.fetched(mark) if f.startswith(SAE)) == [
        f"{SAE}:layers.{n}/{f}" for n in (1, 2) for f in ("cfg.json", "sae.safetensors")]
    assert doc["model"]["hub"]["model.path"]["commit"] == hub.llama.refs["main"]
    local, _ = evaluate("local", loc["lm"], loc["sae"], tmp_path / "home", "store_local")
    assert set(from_hub) == {"id", "t/mona:sae/mean/jaccard", "t/mona:sae/mean/jaccard@layers.1"}
    assert from_hub == local  # equal, not close


def test_a_misspelt_local_path_is_reported_before_any_download(hub, tmp_path):
    loc = hub.local
    data = {"source": str(loc["source"]) + ".typo", "target": loc["target"]}
    mark = hub.mark()
    p = run(tiny_overrides(LLAMA, SAE, data, tmp_path / "out"), tmp_path / "home", hub.url)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("mona_ray: error:")]
    assert line == (f"mona_ray: error: source.paths: input {str(loc['source']) + '.typo'!r} does not exist; "
                    "set source.paths=[/path/to/files_or_folders or URLs]"), line
    assert hub.requests(mark) == [] and not (tmp_path / "home").exists()
