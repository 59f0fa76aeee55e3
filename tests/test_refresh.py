"""The production-refresh fault drill (issue 24), on the real CLI with a tiny model.

Each case damages, fills, kills or contends a run the way a weekly refresh on shared storage
meets it, and checks that the run ends with the reference selection (or a one-line refusal),
never with a traceback, and that a reader of the published selection never sees a missing or
partial one. Full-disk and read-only cases mount a small tmpfs (root with CAP_SYS_ADMIN, as
here and in CI); they are skipped where mounting is not allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import tiny_overrides
from _tiny_lm import make_rows, write_rows

OUTPUTS = ("selected.jsonl", "selected.parquet", "scores.parquet")


def cli(args, env=None, timeout=600, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "mona_ray.run", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def start(args, prefix=()):
    return subprocess.Popen([*prefix, sys.executable, "-m", "mona_ray.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def ok(p) -> None:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


def one_line_error(p, *needles) -> str:
    """The run failed with exit 2 and one ``mona_ray: error:`` line naming what it should, no traceback."""
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("mona_ray: error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert " ERROR " not in p.stderr, p.stderr[-3000:]  # nor Ray's own error lines around it
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def same_selection(out: Path, ref: Path) -> None:
    for f in OUTPUTS:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f


def store_parts(out: Path) -> list[Path]:
    return sorted(out.glob("embeddings/*/part-*.parquet"))


def store_rows(out: Path) -> int:
    n = 0
    for f in store_parts(out):
        try:
            n += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # noqa: BLE001 - a part being renamed into place
            pass
    return n


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def args_for(tiny_lm, tiny_sae, tiny_data):
    def make(out, *extra, data=None):
        return tiny_overrides(tiny_lm, tiny_sae, data or tiny_data, out, "embed.rows_per_unit=4", *extra)
    return make


@pytest.fixture(scope="module")
def reference(args_for, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's default, as a user has it
    p = cli(args_for(out), env=env)
    ok(p)
    (out.parent / "stderr.txt").write_text(p.stderr)
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs: ``mount(size)`` returns its folder; unmounted at the end."""
    mounted = []

    def mount(size: str, name: str = "mnt") -> Path:
        d = tmp_path / name
        d.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


# ----------------------------------------------------------------------------- damaged parts


def test_layout_published_by_one_link(reference):
    cur = reference / "current"
    assert cur.is_symlink() and os.readlink(cur).startswith("runs/")
    for f in (*OUTPUTS, "manifest.json", "rejected.parquet", "dataset_info.json"):
        assert (reference / f).is_symlink() and os.readlink(reference / f) == f"current/{f}"
    m = json.loads((reference / "manifest.json").read_text())
    assert m["status"] == "complete" and m["quarantined"] == [] and m["run_dir"] == str(cur.resolve())
    assert not (reference / ".lock").exists()  # released
    said = (reference.parent / "stderr.txt").read_text()  # a quiet start: no Ray lines that mean nothing to a user
    assert "Token authentication is enabled" not in said and "Progress bars disabled" not in said, said[:2000]
    # every part a later run reuses is recorded
    for part in [*store_parts(reference), *reference.glob("prepared/*/*/*.parquet")]:
        rec = json.loads(part.with_name(part.name + ".ok").read_text())
        assert rec == {"bytes": part.stat().st_size, "rows": pq.ParquetFile(part).metadata.num_rows}


def test_truncated_store_part_is_quarantined_and_embedded_again(reference, args_for, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out, symlinks=True)
    victim = store_parts(out)[3]
    lost = pq.ParquetFile(victim).metadata.num_rows
    cut_in_half(victim)
    p = cli(args_for(out, "run.overwrite=true"))
    ok(p)
    assert f"feature store part {victim} is damaged" in p.stderr and "embedded again" in p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [q["part"] for q in m["quarantined"]] == [str(victim)]
    assert Path(m["quarantined"][0]["moved_to"]).parent == victim.parent / "quarantine"
    assert m["counts"]["embedded_now"] == lost
    same_selection(out, reference)


def test_damaged_page_in_a_store_part_is_one_line_then_rebuilt(reference, args_for, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out, symlinks=True)
    victim = store_parts(out)[5]
    col = pq.ParquetFile(victim).metadata.row_group(0).column(4)  # values: read when scoring, not when indexing
    at = (col.dictionary_page_offset or col.data_page_offset) + col.total_compressed_size - 8
    data = bytearray(victim.read_bytes())
    data[at:at + 4] = bytes(4)  # same size, footer intact: only the read can tell
    victim.write_bytes(bytes(data))
    p = cli(args_for(out, "run.overwrite=true"))
    one_line_error(p, str(victim), "is damaged", "moved aside", "run the same command again")
    assert not victim.exists() and list((victim.parent / "quarantine").iterdir())
    ok(cli(args_for(out, "run.overwrite=true")))
    same_selection(out, reference)


def test_truncated_prepared_part_is_quarantined_and_prepared_again(reference, args_for, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out, symlinks=True)
    victim = sorted(out.glob("prepared/*/source/*[0-9a-f].parquet"))[2]
    cut_in_half(victim)
    p = cli(args_for(out, "run.overwrite=true"))
    ok(p)
    assert f"prepared part {victim} is damaged" in p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [q["part"] for q in m["quarantined"]] == [str(victim)]
    assert m["units"]["prepare"] == 1 and m["counts"]["embedded_now"] == 0  # one unit redone, nothing re-embedded
    same_selection(out, reference)


# ----------------------------------------------------------------------------- the disk and the cluster


def free_space_then_resume(disk: Path, args: list[str], out: Path, reference: Path) -> None:
    """The operator frees space (the tmpfs grows), runs the same command, and gets the reference selection."""
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    ok(cli(args))
    same_selection(out, reference)


def test_disk_full_before_the_run_then_resume(reference, args_for, tmpfs, tmp_path):
    disk = tmpfs("64k")
    out = disk / "out"
    out.mkdir()
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:  # fill it up
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    p = cli(args_for(out, f"embed.store_dir={tmp_path / 'store'}"))
    one_line_error(p, "no space left on device", str(out))
    assert not (out / ".lock").exists()  # no empty lease left to refuse the next run
    ballast.unlink()
    free_space_then_resume(disk, args_for(out, f"embed.store_dir={tmp_path / 'store'}"), out, reference)


def test_full_disk_during_prepare_then_resume(reference, args_for, tmpfs, tmp_path):
    disk = tmpfs("96k")
    out = disk / "out"
    store = tmp_path / "store"  # the store elsewhere: the output folder's disk fills while preparing
    p = cli(args_for(out, f"embed.store_dir={store}"))
    line = one_line_error(p, "no space left on device", str(out / "prepared"), "run the same command again")
    assert "Free space there" in line
    assert not (out / "selected.jsonl").exists()
    free_space_then_resume(disk, args_for(out, f"embed.store_dir={store}"), out, reference)


def test_full_disk_during_embed_then_resume(reference, args_for, tmpfs, tmp_path):
    disk = tmpfs("64k")
    out = tmp_path / "out"
    store = disk / "store"
    p = cli(args_for(out, f"embed.store_dir={store}"))
    one_line_error(p, "no space left on device", str(store))
    assert len(list(out.glob("prepared/*/source/*.parquet.ok"))) > 0  # prepare had finished
    free_space_then_resume(disk, args_for(out, f"embed.store_dir={store}"), out, reference)


def test_read_only_mount_then_resume(reference, args_for, tmpfs):
    disk = tmpfs("16m")
    out = disk / "out"
    out.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    one_line_error(cli(args_for(out)), "read-only file system", str(out), "Remount it read-write")
    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    ok(cli(args_for(out)))
    same_selection(out, reference)


def test_permission_denied_then_resume(reference, args_for, tmp_path):
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run without the capability that overrides permission bits")
    out = tmp_path / "shared" / "out"
    out.parent.mkdir()
    out.parent.chmod(0o555)
    # root ignores permission bits; without CAP_DAC_OVERRIDE it obeys them, as any other user does
    as_user = (setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner")
    one_line_error(cli(args_for(out), prefix=as_user), "permission denied", str(out.parent), "access to it")
    out.parent.chmod(0o755)
    ok(cli(args_for(out), prefix=as_user))
    same_selection(out, reference)


def test_vanished_mount_mid_run_then_resume(reference, args_for, tmpfs):
    disk = tmpfs("16m")
    out = disk / "out"
    proc = start(args_for(out))
    deadline = time.time() + 300
    while store_rows(out) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before its mount went away:\n" + proc.stdout.read()
    subprocess.run(["umount", "-l", str(disk)], check=True)  # the mount goes away under the running job
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]
    (line,) = [x for x in text.splitlines() if x.startswith("mona_ray: error:")]
    # an actor that reads a part first names that file; the driver's check between stages names the folder
    assert str(out) in line and ("went away while the run was writing it" in line or "a vanished mount?" in line), line
    shutil.rmtree(out, ignore_errors=True)  # what the run wrote onto the disk beneath the mount point
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)  # mounted again
    ok(cli(args_for(out)))
    same_selection(out, reference)


def test_unreachable_ray_cluster_is_one_line(args_for, tmp_path):
    t0 = time.time()
    p = cli(args_for(tmp_path / "out", "ray.address=127.0.0.1:9"), timeout=120)
    one_line_error(p, "cannot reach the Ray cluster at '127.0.0.1:9'", "ray.address")
    assert time.time() - t0 < 60  # Ray alone retries for minutes
    assert not (tmp_path / "out" / ".lock").exists()


# ----------------------------------------------------------------------------- the driver killed or stopped


def _interrupt_mid_embedding(args, out: Path, sig: int, group: bool = False) -> subprocess.Popen:
    proc = start(args)
    deadline = time.time() + 300
    while store_rows(out) < 12 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be stopped:\n" + proc.stdout.read()
    if group:
        os.killpg(proc.pid, sig)  # the driver and everything it started (Slurm, `ray job stop`, a terminal)
    else:
        os.kill(proc.pid, sig)  # the driver alone (Kubernetes signals a container's first process)
    return proc


@pytest.mark.parametrize("group", [False, True], ids=["driver", "process-group"])
def test_sigterm_stops_cleanly_and_the_same_command_resumes(reference, args_for, tmp_path, group):
    out = tmp_path / "out"
    args = args_for(out)
    proc = _interrupt_mid_embedding(args, out, signal.SIGTERM, group)
    t0 = time.time()
    text, _ = proc.communicate(timeout=120)
    assert time.time() - t0 < 30, "SIGTERM took too long"
    assert proc.returncode == 143, text[-3000:]
    assert "terminated (SIGTERM); run the same command again to resume" in text and "Traceback" not in text, text[-3000:]
    assert not (out / ".lock").exists() and not (out / "selected.jsonl").exists()
    done = store_rows(out)
    again = cli(args)
    ok(again)
    assert json.loads((out / "manifest.json").read_text())["counts"]["embedded_now"] == 102 - done
    same_selection(out, reference)


def test_sigkill_leaves_a_stale_lease_the_next_run_breaks(reference, args_for, tmp_path):
    out = tmp_path / "out"
    args = args_for(out)
    proc = _interrupt_mid_embedding(args, out, signal.SIGKILL, group=True)
    proc.wait()
    lease = json.loads((out / ".lock").read_text())
    assert lease["pid"] == proc.pid
    attempts = list((out / "runs").iterdir())
    assert len(attempts) == 1 and json.loads((attempts[0] / "manifest.json").read_text())["status"] == "running"
    again = cli(args)
    ok(again)
    assert "broke the lease" in again.stderr and f"its process {proc.pid} on this host is gone" in again.stderr
    same_selection(out, reference)
    assert [d.name for d in (out / "runs").iterdir()] == [os.readlink(out / "current").split("/", 1)[1]]


def test_second_run_on_the_same_folder_is_refused(reference, args_for, tmp_path):
    out = tmp_path / "out"
    args = args_for(out)
    first = start(args)
    deadline = time.time() + 120
    while not (out / ".lock").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    second = cli(args, timeout=120)
    line = one_line_error(second, f"run.output_dir={str(out)!r} is being written by another run", f"pid {first.pid}")
    assert "Wait for it to finish" in line
    text, _ = first.communicate(timeout=600)
    assert first.returncode == 0, text[-3000:]
    same_selection(out, reference)


# ----------------------------------------------------------------------------- a refresh while readers read


def test_refresh_with_new_rows_while_a_reader_polls(args_for, tiny_data, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    write_rows(folder / "a.parquet", make_rows(90, seed=1))
    data = {**tiny_data, "source": folder}
    out, store = tmp_path / "out", tmp_path / "store"
    ok(cli(args_for(out, f"embed.store_dir={store}", data=data)))
    old = (out / "selected.jsonl").read_bytes()
    write_rows(folder / "b.parquet", [{**r, "id": f"new{i}"} for i, r in enumerate(make_rows(30, seed=7))])

    seen, problems, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                sel = (out / "selected.jsonl").read_bytes()  # as a training job reads it
                run = Path(os.path.realpath(out / "current"))  # as a reader that wants files of one run
                man = json.loads((run / "manifest.json").read_text())
                same_run = (run / "selected.jsonl").read_bytes()
            except (OSError, ValueError) as e:
                problems.append(repr(e))
                continue
            if man.get("status") != "complete" or man.get("run_id") != run.name or len(sel.splitlines()) != 10:
                problems.append(f"incomplete: {man.get('status')}, {man.get('run_id')} in {run.name}, "
                                f"{len(sel.splitlines())} rows")
            seen.update([sel, same_run])
            time.sleep(0.005)

    t = threading.Thread(target=reader)
    t.start()
    try:
        ok(cli(args_for(out, f"embed.store_dir={store}", "run.overwrite=true", data=data)))
    finally:
        stop.set()
        t.join()
    new = (out / "selected.jsonl").read_bytes()
    assert not problems, problems[:5]
    assert seen <= {old, new} and old in seen
    # the refreshed selection is the one a fresh run over the grown source makes
    fresh = tmp_path / "fresh"
    ok(cli(args_for(fresh, data=data)))
    same_selection(out, fresh)
    assert new != old
