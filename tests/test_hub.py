"""Hub ids resolved through huggingface_hub against a loopback stand-in for the hub (tests/_hub_server.py).

Each resolution runs in a fresh Python process with ``HF_HOME``/``HF_ENDPOINT``/``HF_HUB_OFFLINE``/
``HF_TOKEN`` in its environment, as a user's run would (huggingface_hub reads them at import). The
server logs every request, so the tests assert what was fetched, not just what came back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _hub_server import HubServer, Repo, folder_files
from _tiny_lm import make_rows, make_tiny_lm
from conftest import make_random_sae
from mona_ray.core import hub
from mona_ray.core.hub import is_hub_ref

TOKEN = "hf_test_good_token"
LLAMA, PICKLED, SPARSIFY, SAELENS, DATA = "tiny/llama", "tiny/pickled", "sae/tiny-sparsify", "sae/tiny-saelens", "data/tiny"
GATED, PRIVATE = "gated/llama", "private/llama"

RUNNER = r"""
import json, sys
from mona_ray.core import hub
for req in json.loads(sys.argv[1]):
    try:
        kind, ref = req["kind"], req["ref"]
        if kind == "model":
            r = hub.resolve_model(ref)
        elif kind == "sae":
            r = hub.resolve_sae(ref, req.get("hookpoint"))
        else:
            r = hub.resolve_dataset(ref)
        print(json.dumps({"path": str(r.path), "repo_id": r.repo_id, "revision": r.revision, "commit": r.commit,
                          "files": [str(f) for f in r.files], "pinned": r.pinned}), flush=True)
    except hub.HubError as e:
        print(f"mona_ray: error: {e}", file=sys.stderr, flush=True)
        print(json.dumps({"error": str(e)}), flush=True)
"""


def dead_endpoint() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def resolve(requests: list[dict], home: Path, endpoint: str, offline: bool = False, token: str | None = None):
    """Resolve ``requests`` in a fresh process; one result dict per request (``{"error": msg}`` on HubError)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if token:
        env["HF_TOKEN"] = token
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(requests)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(out) == len(requests), proc.stdout + proc.stderr
    for r in out:  # an error is one line, printed the way the CLI prints it
        if "error" in r:
            assert "\n" not in r["error"] and f"mona_ray: error: {r['error']}\n" in proc.stderr
    return out


def saelens_sae(d: Path, hook: str, d_in: int, d_sae: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    d.mkdir(parents=True)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.zeros(d_sae),
         "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.zeros(d_in)}
    save_file(w, str(d / "sae_weights.safetensors"))
    save_file({"sparsity": torch.zeros(d_sae)}, str(d / "sparsity.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": d_in, "d_sae": d_sae,
                                            "hook_name": hook, "dtype": "float32"}))


def sparsify_repo(tmp: Path, k: int, seed: int) -> dict[str, bytes]:
    root = tmp / f"sparsify_k{k}"
    for layer in range(3):
        sae_root = make_random_sae(root, d_in=32, latents=64, k=k, hookpoint=f"layers.{layer}", seed=seed + layer)
    return {**folder_files(sae_root), "README.md": b"# a sparsify SAE, one folder per layer\n"}


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub_repos")
    from transformers import AutoModelForCausalLM

    lm = make_tiny_lm(tmp / "lm", layers=3, hidden=32)
    sharded = tmp / "sharded"  # shards + index, and a consolidated copy loading must not fetch
    AutoModelForCausalLM.from_pretrained(lm).save_pretrained(sharded, max_shard_size="40KB")
    for f in lm.iterdir():
        if not f.name.startswith("model") and f.name != "config.json":
            (sharded / f.name).write_bytes(f.read_bytes())
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    lm_files = folder_files(sharded)
    extras = {"README.md": b"# tiny llama\n", "pytorch_model.bin": b"not a pickle, never fetched",
              "consolidated.safetensors": (lm / "model.safetensors").read_bytes(),
              "original/consolidated.00.pth": b"never fetched", "onnx/model.safetensors": b"never fetched"}
    rows = make_rows(30, seed=3)
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[:20]), tmp / "part.parquet")
    saelens_sae(tmp / "saelens" / "blocks.1.hook_resid_post", "blocks.1.hook_resid_post", 32, 64, seed=5)
    saelens_sae(tmp / "saelens" / "custom_l2", "blocks.2.hook_resid_post", 32, 64, seed=6)

    with HubServer(tokens=(TOKEN,)) as server:
        server.add(Repo(LLAMA)).commit({**lm_files, **extras})
        server.add(Repo(PICKLED)).commit({"config.json": lm_files["config.json"], "pytorch_model.bin": b"x" * 64,
                                          "README.md": b"#\n"})
        sae = server.add(Repo(SPARSIFY))
        server.old_sae = sae.commit(sparsify_repo(tmp, k=4, seed=10), "v1.0")
        server.new_sae = sae.commit(sparsify_repo(tmp, k=8, seed=20), "main")
        server.add(Repo(SAELENS)).commit({**folder_files(tmp / "saelens"), "README.md": b"#\n"})
        data = server.add(Repo(DATA, repo_type="dataset"))
        server.old_data = data.commit({"data/train.jsonl": jsonl[: len(jsonl) // 2], "README.md": b"#\n"}, "v1.0")
        data.commit({"data/train.jsonl": jsonl, "data/extra.parquet": (tmp / "part.parquet").read_bytes(),
                     "README.md": b"---\nconfigs: []\n---\n# tiny data\n", ".gitattributes": b"*.parquet lfs\n"})
        server.add(Repo(GATED, gated=True)).commit(folder_files(lm))
        server.add(Repo(PRIVATE, private=True)).commit(folder_files(lm))
        server.lm_files, server.rows = lm_files, rows
        yield server


@pytest.fixture(scope="module")
def filled(hub_server, tmp_path_factory):
    """A cache filled by one run resolving a model, an SAE (layers.1) and a dataset."""
    home = tmp_path_factory.mktemp("hf_home")
    mark = hub_server.mark()
    out = resolve([{"kind": "model", "ref": LLAMA}, {"kind": "sae", "ref": SPARSIFY, "hookpoint": "layers.1"},
                   {"kind": "dataset", "ref": f"hf://datasets/{DATA}"}], home, hub_server.url)
    return {"home": home, "out": out, "fetched": hub_server.fetched(mark), "requests": hub_server.requests(mark)}


# ----------------------------------------------------------------------------- rules, without a hub

def test_what_is_a_hub_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    hub_ids = ["meta-llama/Meta-Llama-3-8B", "EleutherAI/sae-llama-3-8b-32x", "teknium/OpenHermes-2.5",
               "org/name@v1.0", "org/name@" + "a" * 40, "hf://org/name", "hf://org/name@main/layers.3"]
    local = ["org/local", "data/x.jsonl", "data/x.parquet", "ckpt/model.safetensors", "./org/name", "/abs/org/name",
             "~/org/name", "name", "a/b/c", "embedded:smollm2-135m-instruct", "org/-bad", "org/a..b", "org/a--b",
             "hf://datasets/org/name"]
    assert [s for s in hub_ids if not is_hub_ref(s)] == []
    assert [s for s in local if is_hub_ref(s)] == []
    assert is_hub_ref("hf://datasets/org/name/data/*.jsonl", "dataset")
    assert is_hub_ref("hf://datasets/org/name@v1/x.json", "dataset")
    assert not is_hub_ref("org/name", "dataset")  # data from the hub is always hf://datasets/...
    assert not is_hub_ref("hf://org/name", "dataset")
    r = hub.parse_ref("hf://datasets/org/name@refs/pr/3/data/*.parquet", "dataset")
    assert (r.repo_id, r.repo_type, r.revision, r.path_in_repo) == ("org/name", "dataset", "refs/pr/3", "data/*.parquet")
    assert hub.parse_ref("org/name@v1.0") == hub.HubRef("org/name", "model", "v1.0", "", "org/name@v1.0")
    with pytest.raises(hub.HubError, match=r"^source.paths='data/x.jsonl': not a hub reference \(expected hf://datasets/"):
        hub.resolve_dataset("data/x.jsonl")


def test_which_files_of_a_listing():
    listing = ["README.md", "config.json", "tokenizer.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "original/tokenizer.model", "onnx/model.safetensors", "chat_template.jinja"]
    meta, weights = hub.model_files(listing)
    assert meta == ["config.json", "tokenizer.json", "model.safetensors.index.json", "chat_template.jinja"]
    assert weights == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    data = ["README.md", "a.json", "data/t-0.parquet", "data/t-1.parquet", "data/x.jsonl.gz", "sub/y.jsonl",
            "state.json.lock", "d/data-00000-of-00001.arrow", "script.py"]
    assert hub.data_files(data) == ["a.json", "d/data-00000-of-00001.arrow", "data/t-0.parquet", "data/t-1.parquet",
                                    "data/x.jsonl.gz", "sub/y.jsonl"]
    assert hub.data_files(data, "data/*.parquet") == ["data/t-0.parquet", "data/t-1.parquet"]
    assert hub.data_files(data, "data") == ["data/t-0.parquet", "data/t-1.parquet", "data/x.jsonl.gz"]
    assert hub.data_files(data, "sub/y.jsonl") == ["sub/y.jsonl"]
    assert hub.data_files(data, "dat") == []
    sae = ["layers.0/cfg.json", "layers.0/sae.safetensors", "layers.1/cfg.json", "layers.1/sae.safetensors",
           "layers.2/sae.safetensors", "blocks.4.hook_resid_pre/cfg.json",
           "blocks.4.hook_resid_pre/sae_weights.safetensors", "README.md"]
    folders = hub.sae_folders(sae)
    assert folders == {"layers.0": "sparsify", "layers.1": "sparsify", "blocks.4.hook_resid_pre": "saelens"}
    assert hub.pick_sae(folders, "layers.1") == ["layers.1"]
    assert hub.pick_sae(folders, "blocks.1.hook_resid_post") == ["layers.1"]
    assert hub.pick_sae(folders, "layers.3") == ["blocks.4.hook_resid_pre"]  # the input of block 4
    assert hub.pick_sae(folders, "layers.2") == []
    assert hub.pick_sae(folders, "layers.2", "layers.0") == ["layers.0"]


# ----------------------------------------------------------------------------- through the stand-in hub

def test_model_fetches_only_what_loading_needs_and_loads(hub_server, filled):
    from mona_ray.core.model import load_tokenizer, load_truncated, resolve_model_path

    model = filled["out"][0]
    assert model["repo_id"] == LLAMA and model["revision"] == "main"
    assert model["commit"] == hub_server.repos[("model", LLAMA)].refs["main"]
    want = {f"{LLAMA}:{f}" for f in hub_server.lm_files}
    assert {f for f in filled["fetched"] if f.startswith(LLAMA)} == want  # no README, .bin, .pth, consolidated, onnx
    path = Path(model["path"])
    assert path.name == model["commit"] and resolve_model_path(str(path)) == path
    lm = load_truncated(path, layer=1, dtype="float32", device="cpu")
    tok = load_tokenizer(path)
    ids = tok("the cat sat on the mat", return_tensors="pt")
    out = lm(ids["input_ids"], ids["attention_mask"])
    assert out.shape == (1, ids["input_ids"].shape[1], 32) and torch.isfinite(out).all()


def test_sae_fetches_only_the_hooked_layer_and_a_second_run_fetches_nothing(hub_server, filled):
    from mona_ray.core.sae import load_sae

    sae = filled["out"][1]
    assert {f for f in filled["fetched"] if f.startswith(SPARSIFY)} == {
        f"{SPARSIFY}:layers.1/cfg.json", f"{SPARSIFY}:layers.1/sae.safetensors"}
    assert sae["commit"] == hub_server.new_sae and Path(sae["path"]).name == "layers.1"
    loaded = load_sae(sae["path"], hookpoint="layers.1")
    assert (loaded.k, loaded.num_latents, loaded.d_in, loaded.hookpoint) == (8, 64, 32, "layers.1")
    assert load_sae(Path(sae["path"]).parent, hookpoint="layers.1").fingerprint == loaded.fingerprint

    mark = hub_server.mark()
    again = resolve([{"kind": "model", "ref": LLAMA}, {"kind": "sae", "ref": SPARSIFY, "hookpoint": "layers.1"},
                     {"kind": "dataset", "ref": f"hf://datasets/{DATA}"}], filled["home"], hub_server.url)
    assert again == filled["out"]
    assert hub_server.requests(mark, "file") == [] and hub_server.requests(mark, "tree") == []
    assert len(hub_server.requests(mark, "info")) == 3  # main resolved to its commit once per repository

    mark = hub_server.mark()  # SAELens naming of the same hook: the same folder, nothing new
    same = resolve([{"kind": "sae", "ref": SPARSIFY, "hookpoint": "blocks.1.hook_resid_post"}], filled["home"],
                   hub_server.url)
    assert same[0]["path"] == sae["path"] and hub_server.fetched(mark) == set()


def test_a_pinned_revision_resolves_to_its_commit(hub_server, tmp_path):
    from mona_ray.core.sae import load_sae

    mark = hub_server.mark()
    tag, = resolve([{"kind": "sae", "ref": f"{SPARSIFY}@v1.0", "hookpoint": "layers.2"}], tmp_path, hub_server.url)
    assert (tag["revision"], tag["commit"]) == ("v1.0", hub_server.old_sae)
    assert tag["pinned"] == f"{SPARSIFY}@{hub_server.old_sae}"
    assert hub_server.fetched(mark) == {f"{SPARSIFY}:layers.2/cfg.json", f"{SPARSIFY}:layers.2/sae.safetensors"}
    assert load_sae(tag["path"], hookpoint="layers.2").k == 4  # the old commit's SAE, not main's

    mark = hub_server.mark()  # a commit hash: already resolved and cached, so the hub is not asked at all
    pinned, = resolve([{"kind": "sae", "ref": tag["pinned"], "hookpoint": "layers.2"}], tmp_path, hub_server.url)
    assert pinned["commit"] == hub_server.old_sae and pinned["path"] == tag["path"]
    assert [r for r in hub_server.requests(mark) if r[2] == SPARSIFY] == []


def test_saelens_repository_fetches_only_the_named_sae(hub_server, tmp_path):
    from mona_ray.core.sae import load_sae

    mark = hub_server.mark()
    by_name, by_cfg = resolve([{"kind": "sae", "ref": SAELENS, "hookpoint": "layers.1"},
                               {"kind": "sae", "ref": SAELENS, "hookpoint": "layers.2"}], tmp_path, hub_server.url)
    assert hub_server.fetched(mark) == {
        f"{SAELENS}:blocks.1.hook_resid_post/cfg.json", f"{SAELENS}:blocks.1.hook_resid_post/sae_weights.safetensors",
        f"{SAELENS}:custom_l2/cfg.json", f"{SAELENS}:custom_l2/sae_weights.safetensors"}  # no sparsity.safetensors
    assert Path(by_name["path"]).name == "blocks.1.hook_resid_post" and Path(by_cfg["path"]).name == "custom_l2"
    assert load_sae(by_name["path"], hookpoint="layers.1").meta["format"] == "saelens"
    assert load_sae(by_cfg["path"], hookpoint="layers.2").hookpoint == "layers.2"


def test_dataset_files_path_glob_and_revision(hub_server, filled, tmp_path):
    import pyarrow.parquet as pq

    data = filled["out"][2]
    assert {f for f in filled["fetched"] if f.startswith(DATA)} == {f"{DATA}:data/train.jsonl",
                                                                    f"{DATA}:data/extra.parquet"}
    files = [Path(f) for f in data["files"]]
    assert [f.name for f in files] == ["extra.parquet", "train.jsonl"]
    assert files[0].parent == Path(data["path"]) / "data" and Path(data["path"]).name == data["commit"]
    assert pq.read_table(files[0]).to_pylist() == hub_server.rows[:20]
    rows = [json.loads(line) for line in files[1].read_text().splitlines()]
    assert rows == hub_server.rows

    mark = hub_server.mark()
    glob, old = resolve([{"kind": "dataset", "ref": f"hf://datasets/{DATA}/data/*.parquet"},
                         {"kind": "dataset", "ref": f"hf://datasets/{DATA}@v1.0/data"}], tmp_path, hub_server.url)
    assert [Path(f).name for f in glob["files"]] == ["extra.parquet"]
    assert old["commit"] == hub_server.old_data and Path(old["path"]).name == "data"
    assert old["pinned"] == f"hf://datasets/{DATA}@{hub_server.old_data}/data"
    assert len(Path(old["files"][0]).read_text().splitlines()) < len(rows)
    assert hub_server.fetched(mark) == {f"{DATA}:data/extra.parquet", f"{DATA}:data/train.jsonl"}


def test_offline_uses_the_cache_without_a_hub(filled, tmp_path):
    down = dead_endpoint()
    cached = [{"kind": "model", "ref": LLAMA}, {"kind": "sae", "ref": SPARSIFY, "hookpoint": "layers.1"},
              {"kind": "dataset", "ref": f"hf://datasets/{DATA}"}]
    out = resolve(cached + [{"kind": "sae", "ref": SPARSIFY, "hookpoint": "layers.0"},
                            {"kind": "sae", "ref": SPARSIFY, "hookpoint": "layers.7"}],
                  filled["home"], down, offline=True)
    assert out[:3] == filled["out"]
    assert out[3]["error"].startswith("sae.path='sae/tiny-sparsify': HF_HUB_OFFLINE=1 and sae/tiny-sparsify@main is "
                                      "only partly in the cache") and "missing layers.0/cfg.json" in out[3]["error"]
    assert "it has: layers.0, layers.1, layers.2" in out[4]["error"]  # hookpoints from the cached listing

    empty, = resolve([{"kind": "model", "ref": LLAMA}], tmp_path, down, offline=True)
    assert empty["error"].startswith("model.path='tiny/llama': HF_HUB_OFFLINE=1 and tiny/llama@main is not in the "
                                     "cache") and "unset HF_HUB_OFFLINE" in empty["error"]

    # the network down, offline mode not set: the library falls back on the cache for what it has
    back = resolve(cached[:2], filled["home"], down)
    assert back == filled["out"][:2]


def test_network_failure_with_nothing_cached(tmp_path):
    down = dead_endpoint()
    out, = resolve([{"kind": "sae", "ref": SPARSIFY, "hookpoint": "layers.1"}], tmp_path, down)
    assert out["error"].startswith(f"sae.path='sae/tiny-sparsify': cannot reach the hub at {down} (ConnectError")
    assert "set HF_HUB_OFFLINE=1 to use the cache" in out["error"]


def test_each_failure_has_its_message(hub_server, tmp_path):
    out = resolve([{"kind": "model", "ref": "nobody/nothing"},
                   {"kind": "model", "ref": GATED},
                   {"kind": "model", "ref": PRIVATE},
                   {"kind": "sae", "ref": f"{SPARSIFY}@v9", "hookpoint": "layers.1"},
                   {"kind": "model", "ref": PICKLED},
                   {"kind": "sae", "ref": SPARSIFY, "hookpoint": "layers.5"},
                   {"kind": "sae", "ref": LLAMA, "hookpoint": "layers.1"},
                   {"kind": "dataset", "ref": f"hf://datasets/{DATA}/nothing/*.csv"},
                   {"kind": "dataset", "ref": "hf://datasets/nobody/nothing"}], tmp_path, hub_server.url)
    errors = [r["error"] for r in out]
    assert errors[0] == (f"model.path='nobody/nothing': no model repository 'nobody/nothing' at {hub_server.url} "
                         "(if it is private or gated, set HF_TOKEN); check the name, or point at a local path")
    assert errors[1] == (f"model.path='gated/llama': gated/llama is a gated repository: accept its terms at "
                         f"{hub_server.url}/gated/llama and set HF_TOKEN (or run `hf auth login`)")
    assert errors[2].startswith("model.path='private/llama': no model repository 'private/llama'")
    assert errors[3] == ("sae.path='sae/tiny-sparsify@v9': revision 'v9' does not exist in sae/tiny-sparsify "
                         "(use a branch, a tag or a commit hash of that repository)")
    assert errors[4].startswith("model.path='tiny/pickled': tiny/pickled has no *.safetensors weights, only pickled "
                                "ones (pytorch_model.bin), which mona_ray never loads")
    assert errors[5] == ("sae.path='sae/tiny-sparsify': no SAE for hookpoint 'layers.5' in sae/tiny-sparsify; "
                         "it has: layers.0, layers.1, layers.2")
    assert errors[6].startswith("sae.path='tiny/llama': tiny/llama holds no SAE")
    assert errors[7].startswith(f"source.paths='hf://datasets/{DATA}/nothing/*.csv': no data file") \
        and "it has: .gitattributes, README.md, data/extra.parquet, data/train.jsonl" in errors[7]
    assert errors[8].startswith("source.paths='hf://datasets/nobody/nothing': no dataset repository 'nobody/nothing'")
    assert not any(p.is_file() for p in tmp_path.rglob("*.safetensors"))  # nothing was downloaded for any of them

    wrong, = resolve([{"kind": "model", "ref": GATED}], tmp_path, hub_server.url, token="hf_without_access")
    assert "gated repository" in wrong["error"] and "use a token that has access (HF_TOKEN)" in wrong["error"]
    revoked, = resolve([{"kind": "model", "ref": LLAMA}], tmp_path, hub_server.url, token="revoked")
    assert revoked["error"] == ("model.path='tiny/llama': the hub refused HF_TOKEN (invalid or expired); set a valid "
                                "token or unset it")
    gated, private = resolve([{"kind": "model", "ref": GATED}, {"kind": "model", "ref": PRIVATE}], tmp_path,
                             hub_server.url, token=TOKEN)
    assert gated["commit"] == hub_server.repos[("model", GATED)].refs["main"]
    assert private["commit"] == hub_server.repos[("model", PRIVATE)].refs["main"]


# ----------------------------------------------------------------------------- caches as other tools leave them

def fill_as_users_do(code: str, home: Path, endpoint: str) -> None:
    """Run ``code`` (transformers / huggingface_hub calls) in a fresh process against the stand-in hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


USERS_CACHE = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
from huggingface_hub import hf_hub_download, snapshot_download
AutoTokenizer.from_pretrained({LLAMA!r}); AutoModelForCausalLM.from_pretrained({LLAMA!r})
snapshot_download({SPARSIFY!r}, allow_patterns=["layers.1/*"])
hf_hub_download({DATA!r}, "data/train.jsonl", repo_type="dataset")
"""


def test_offline_from_caches_without_a_listing(hub_server, filled, tmp_path):
    """A cache as transformers' from_pretrained, hf_hub_download or an older huggingface_hub leave it:
    refs/ and snapshots/ but no trees/ listing. Offline, each resolves from its snapshot folder; a
    copied cache (plain files) and a commit without a refs file too; what is not there is one line."""
    import shutil

    home = tmp_path / "home"
    fill_as_users_do(USERS_CACHE, home, hub_server.url)
    hub_dir = home / "hub"
    for trees in hub_dir.glob("*/trees"):  # what huggingface_hub < 2 never wrote
        shutil.rmtree(trees)
    assert not list(hub_dir.glob("*/trees")) and list(hub_dir.glob("models--tiny--llama/refs/main"))
    snap = next(hub_dir.glob("models--tiny--llama/snapshots/*"))
    assert (snap / "config.json").is_symlink()
    down = dead_endpoint()
    reqs = [{"kind": "model", "ref": LLAMA}, {"kind": "sae", "ref": SPARSIFY, "hookpoint": "layers.1"},
            {"kind": "dataset", "ref": f"hf://datasets/{DATA}"}]
    model, sae, data = resolve(reqs, home, down, offline=True)
    assert model["commit"] == hub_server.repos[("model", LLAMA)].refs["main"] == snap.name
    assert model["path"] == str(snap)
    assert sorted(Path(f).name for f in model["files"]) == sorted(
        f for f in hub_server.lm_files if f in hub.MODEL_FILES or f.endswith(".safetensors"))
    assert (sae["commit"], Path(sae["path"]).name) == (hub_server.new_sae, "layers.1")
    assert [Path(f).name for f in data["files"]] == ["train.jsonl"] and data["commit"] == filled["out"][2]["commit"]

    # a copied cache (plain files, no blobs, no refs): a revision named by its commit
    copy = tmp_path / "copy" / "hub"
    shutil.copytree(hub_dir, copy, symlinks=False, ignore=shutil.ignore_patterns("blobs", "refs", ".locks"))
    assert not (copy / snap.relative_to(hub_dir) / "config.json").is_symlink()
    pinned = [{"kind": "model", "ref": f"{LLAMA}@{snap.name}"},
              {"kind": "sae", "ref": f"hf://{SPARSIFY}@{hub_server.new_sae}", "hookpoint": "layers.1"},
              {"kind": "dataset", "ref": f"hf://datasets/{DATA}@{data['commit']}/data"}]
    m2, s2, d2 = resolve(pinned + [{"kind": "model", "ref": LLAMA}], copy.parent, down, offline=True)[:3]
    assert m2["commit"] == model["commit"] and Path(m2["path"]) == copy / snap.relative_to(hub_dir)
    assert s2["commit"] == sae["commit"] and [Path(f).name for f in d2["files"]] == ["train.jsonl"]
    main, = resolve([{"kind": "model", "ref": LLAMA}], copy.parent, down, offline=True)
    assert main["error"] == (f"model.path='tiny/llama': HF_HUB_OFFLINE=1 and tiny/llama@main is not in the cache "
                             f"({copy}); it holds tiny/llama@{snap.name} (name that commit to use it); run once with "
                             "network access, or unset HF_HUB_OFFLINE")

    # what the snapshot folder lacks: one line, "only partly in the cache", naming it
    shard = sorted(snap.glob("model-*.safetensors"))[-1]
    shard.unlink()
    (copy / sae["path"].split("/hub/", 1)[1] / "sae.safetensors").unlink()
    out = resolve([reqs[0], {"kind": "sae", "ref": SPARSIFY, "hookpoint": "layers.0"}], home, down, offline=True)
    out += resolve([pinned[1]], copy.parent, down, offline=True)
    assert out[0]["error"] == (f"model.path='tiny/llama': HF_HUB_OFFLINE=1 and tiny/llama@main is only partly in the "
                               f"cache ({hub_dir}): missing {shard.name}; run once with network access, or unset "
                               "HF_HUB_OFFLINE")
    assert out[1]["error"].startswith("sae.path='sae/tiny-sparsify': HF_HUB_OFFLINE=1 and sae/tiny-sparsify@main is "
                                      f"only partly in the cache ({hub_dir}): no SAE for hookpoint 'layers.0' among "
                                      "the cached ones: layers.1;")
    assert "only partly in the cache" in out[2]["error"] and "no SAE among its files" in out[2]["error"]

    # online, the same cache is completed from the hub (its listing), saying what it fetches
    mark = hub_server.mark()
    again, = resolve([reqs[0]], home, hub_server.url)
    assert again["commit"] == model["commit"] and hub_server.fetched(mark) == {f"{LLAMA}:{shard.name}"}
