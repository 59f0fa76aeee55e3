"""The cluster launch files under launch/ and the Dockerfile are valid and point at real things.

The last test starts a real local Ray cluster (``ray start --head`` on 127.0.0.1 with free
ports) and runs ``launch/submit.sh`` against it on a few demo rows with the embedded model.
It needs the Ray dashboard (the Jobs API), i.e. ``ray[default]``; it is skipped with that
reason where only ``ray[data]`` is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from _ray_nodes import Cluster

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
EXPERIMENTS = ROOT / "mona_ray" / "conf" / "experiment"
SHELL_SCRIPTS = [LAUNCH / "submit.sh", LAUNCH / "slurm.sbatch"]
TEXT_FILES = sorted(p for p in LAUNCH.rglob("*") if p.is_file()) + [ROOT / "Dockerfile"]


def _yaml_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((LAUNCH / name).read_text()) if d]


def _by_kind(docs, kind):
    (doc,) = [d for d in docs if d.get("kind") == kind]
    return doc


def _entrypoint_overrides(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "mona_ray.run"], argv
    return argv[3:]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import mona_ray.config  # noqa: F401  (registers the asset resolver)

    with initialize_config_dir(version_base=None, config_dir=str(ROOT / "mona_ray" / "conf")):
        return compose("config", overrides=overrides)


# ----------------------------------------------------------------------------- static checks


def test_every_yaml_parses_and_kubernetes_objects_are_well_formed():
    for path in LAUNCH.rglob("*.yaml"):
        for doc in _yaml_docs(path.relative_to(LAUNCH).as_posix()):
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), path


def _check_rayjob_spec(spec: dict) -> None:
    assert spec["backoffLimit"] >= 1  # a failed job is retried on a new cluster and resumes
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = cluster["workerGroupSpecs"]
    gpus = sum(int(w["replicas"]) * int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for w in workers)
    assert gpus >= 2, "a multi-GPU cluster"
    images = {c["image"] for c in head["containers"]} | {c["image"] for w in workers for c in w["template"]["spec"]["containers"]}
    assert len(images) == 1, "head and workers run the same image"
    # the output folder lives on the shared volume that every pod mounts
    overrides = dict(o.split("=", 1) for o in _entrypoint_overrides(spec["entrypoint"]) if "=" in o)
    mounts = [m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])]
    for key in ("run.output_dir", "embed.store_dir"):
        assert any(overrides[key].startswith(m + "/") for m in mounts), (key, overrides[key], mounts)
    for w in workers:
        wm = [m["mountPath"] for c in w["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert set(mounts) <= set(wm)
    dockerfile = (ROOT / "Dockerfile").read_text()
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", dockerfile).group(1)
    assert cluster["rayVersion"] == ray_version


def test_rayjob_manifest():
    docs = _yaml_docs("rayjob.yaml")
    job = _by_kind(docs, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    _check_rayjob_spec(job["spec"])
    pvc = _by_kind(docs, "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_raycronjob_manifest():
    cron = _by_kind(_yaml_docs("raycronjob.yaml"), "RayCronJob")
    assert cron["apiVersion"] == "ray.io/v1"
    assert len(cron["spec"]["schedule"].split()) == 5
    _check_rayjob_spec(cron["spec"]["jobTemplate"])


def test_referenced_experiments_exist():
    found = set()
    for path in TEXT_FILES:
        text = path.read_text()
        found |= set(re.findall(r"\+experiment=([\w.-]+)", text))
        found |= set(re.findall(r"MONA_EXPERIMENT-([\w.-]+)", text))  # defaults in the shell scripts
    assert found, "the launch files run an experiment config"
    for name in found:
        assert (EXPERIMENTS / f"{name}.yaml").is_file(), f"+experiment={name}: no {EXPERIMENTS / name}.yaml"


@pytest.mark.parametrize("manifest, path", [("rayjob.yaml", ("spec",)), ("raycronjob.yaml", ("spec", "jobTemplate"))])
def test_manifest_entrypoints_compose(manifest, path):
    """Every override in the manifests names a real config key (Hydra rejects unknown ones)."""
    doc = [d for d in _yaml_docs(manifest) if d["kind"] in ("RayJob", "RayCronJob")][0]
    for key in path:
        doc = doc[key]
    cfg = _compose(_entrypoint_overrides(doc["entrypoint"]))
    assert cfg.sae.hookpoint == "layers.30" and cfg.sae.k == 192


def test_cron_and_systemd_overrides_compose():
    cron = [ln for ln in (LAUNCH / "cron" / "mona-ray-refresh.cron").read_text().splitlines()
            if ln.strip() and not ln.startswith("#") and "=" not in ln.split()[0]]
    assert len(cron) == 1 and len(cron[0].split()) > 6  # five time fields, a user, a command
    service = (LAUNCH / "systemd" / "mona-ray-refresh.service").read_text()
    timer = (LAUNCH / "systemd" / "mona-ray-refresh.timer").read_text()
    assert "Type=oneshot" in service and "launch/submit.sh" in service
    assert re.search(r"^OnCalendar=", timer, re.M) and "WantedBy=timers.target" in timer
    (exec_start,) = [ln for ln in service.splitlines() if ln.startswith("ExecStart=")]
    for line in (cron[0], exec_start):
        tail = line.split("launch/submit.sh", 1)[1].split(">>")[0].rstrip("' ")
        cfg = _compose(["+experiment=openhermes_llama3", *shlex.split(tail)])
        assert str(cfg.model.path).startswith("/shared/")


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_dockerfile_copies_existing_files_and_uses_a_cuda_torch_base():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text).group(1)
    assert re.match(r"(pytorch/pytorch:[\w.]+-cuda[\d.]+-cudnn\d+-(runtime|devel)|nvidia/cuda:)", base), base
    pin = re.search(r'"torch==([\w.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    if base.startswith("pytorch/pytorch:"):
        assert base.split(":")[1].startswith(pin + "-"), f"base image torch differs from the pin torch=={pin}"
    copies = re.findall(r"^COPY\s+(.+)$", text, re.M)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "pip install" in text and "--constraint" in text  # torch from the base image is kept
    assert "ray[default" in text  # the dashboard serves the Jobs API that RayJob submits through


def test_submit_sh_builds_the_documented_command(tmp_path):
    env = {**os.environ, "MONA_DRY_RUN": "1", "RAY_ADDRESS": "http://head:8265", "MONA_OUTPUT_DIR": "/shared/out"}
    out = subprocess.run([str(LAUNCH / "submit.sh"), "model.path=/m", "source.paths=[/a b,/c]"], env=env,
                         capture_output=True, text=True, check=True).stdout
    argv = shlex.split(out)
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://head:8265"
    assert argv[argv.index("--working-dir") + 1] == str(ROOT)
    entry = argv[argv.index("--") + 1:]
    assert entry == ["python", "-m", "mona_ray.run", "+experiment=openhermes_llama3", "model.path=/m",
                     "source.paths=[/a b,/c]", "run.output_dir=/shared/out"]


@pytest.mark.parametrize("env, msg", [
    ({}, "MONA_OUTPUT_DIR"),
    ({"MONA_OUTPUT_DIR": "relative/out"}, "absolute"),
    ({"MONA_OUTPUT_DIR": "/x", "MONA_EXPERIMENT": "nope"}, "no mona_ray/conf/experiment/nope.yaml"),
])
def test_submit_sh_refuses_bad_settings(env, msg):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MONA_")}
    r = subprocess.run([str(LAUNCH / "submit.sh")], env={**base, "MONA_DRY_RUN": "1", **env},
                       capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr


# ----------------------------------------------------------------------------- a real local cluster


@pytest.fixture
def local_ray_cluster():
    """`ray start --head` on 127.0.0.1 with free ports; stopped by killing its process group only."""
    if importlib.util.find_spec("aiohttp") is None:
        pytest.skip('the Ray Jobs API needs the dashboard: pip install -e ".[cluster]" (ray[default]; aiohttp is missing)')
    work = Path(tempfile.mkdtemp(prefix="mrl", dir="/tmp"))  # short: Ray's socket paths are length-limited
    cluster = Cluster(work)
    try:
        cluster.start_head(num_cpus=2)
        yield {"address": cluster.address, "env": cluster.env, "work": work}
    finally:
        cluster.stop()


def _tiny_inputs(work: Path) -> dict:
    """A few demo rows, a few target rows, a small random SAE for the embedded model at the
    default config's hookpoint (so the run needs no sae.hookpoint override)."""
    import pyarrow.parquet as pq
    import torch

    from mona_ray.config import load_config
    from mona_ray.core.sae import SAE, save_sparsify

    assets = ROOT / "mona_ray" / "assets" / "demo"
    pq.write_table(pq.read_table(assets / "source.parquet").slice(0, 8), work / "src.parquet")
    pq.write_table(pq.read_table(assets / "target_gsm8k.parquet").slice(0, 3), work / "tgt.parquet")
    g = torch.Generator().manual_seed(0)
    W = torch.randn(1152, 576, generator=g) / 24
    save_sparsify(SAE(W_enc=W, b_enc=torch.zeros(1152), W_dec=W.clone(), b_dec=torch.zeros(576), k=8,
                      hookpoint=load_config([]).sae.hookpoint), work / "sae")
    return {"src": work / "src.parquet", "tgt": work / "tgt.parquet", "sae": work / "sae"}


@pytest.mark.slow
def test_submit_sh_runs_the_demo_on_a_local_ray_cluster(local_ray_cluster):
    c = local_ray_cluster
    work = c["work"]
    inputs = _tiny_inputs(work)
    out = work / "out"
    env = {**c["env"], "RAY_ADDRESS": c["address"], "MONA_EXPERIMENT": "", "MONA_PYTHON": sys.executable,
           "MONA_OUTPUT_DIR": str(out), "MONA_SUBMISSION_ID": f"test-{os.getpid()}"}
    r = subprocess.run([str(LAUNCH / "submit.sh"), f"source.paths=[{inputs['src']}]", f"target.paths=[{inputs['tgt']}]",
                        f"sae.path={inputs['sae']}", "render.max_length=64"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=work)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "constructor arguments in the object store" not in r.stdout + r.stderr  # the actors restart cleanly
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["source"]["rows_in"] == 8
    selected = (out / "selected.jsonl").read_text().splitlines()
    assert len(selected) == manifest["selection"]["k"] >= 1
