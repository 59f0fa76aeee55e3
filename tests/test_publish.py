"""The pieces of a safe refresh, without Ray: recorded parts, the lease, publishing, one-line failures."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from mona_ray.core.io import (DamagedFile, check_recorded, filesystem_failure, quarantine, read_parquet,
                             write_parquet, write_part)
from mona_ray.pipeline import publish
from mona_ray.pipeline.publish import OutputBusy, OutputLock


def test_recorded_parts_check_size_rows_and_footer(tmp_path):
    t = pa.table({"x": list(range(100))})
    part = tmp_path / "part-a.parquet"
    write_part(t, part)
    assert check_recorded(part) is None
    assert json.loads((tmp_path / "part-a.parquet.ok").read_text()) == {"bytes": part.stat().st_size, "rows": 100}
    data = part.read_bytes()
    part.write_bytes(data[:-10])
    assert "bytes on disk" in check_recorded(part)
    ok = tmp_path / "part-a.parquet.ok"
    ok.write_text(json.dumps({"bytes": len(data) - 10, "rows": 100}))  # a record that agrees with a cut file
    assert "not a readable Parquet file" in check_recorded(part)
    write_parquet(pa.table({"x": [1, 2]}), part)  # a whole file, but not the one written
    ok.write_text(json.dumps({"bytes": part.stat().st_size, "rows": 3}))
    assert check_recorded(part) == "2 rows on disk, 3 written"
    ok.write_text("[1, 2]")
    assert check_recorded(part) == "its record part-a.parquet.ok cannot be read"
    legacy = tmp_path / "legacy.parquet"
    write_parquet(t, legacy)  # no sidecar: trusted when its footer reads
    assert check_recorded(legacy) is None
    staged = tmp_path / "copy.jsonl"
    staged.write_text("{}\n")
    assert "no record" in check_recorded(staged)  # a non-Parquet file is trusted only with its record
    assert check_recorded(tmp_path / "nothing.parquet") == "missing"
    moved = quarantine(part)
    assert moved.parent == tmp_path / "quarantine"
    assert not part.exists() and moved.exists() and moved.with_name(moved.name + ".ok").exists()
    assert quarantine(part) is None


def test_a_damaged_page_fails_loudly_never_as_other_values(tmp_path):
    part = tmp_path / "part-b.parquet"
    write_part(pa.table({"h": [f"row{i}" for i in range(300)], "v": [float(i) for i in range(300)]}), part)
    data = bytearray(part.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(16)  # a damaged page; the size and the footer are intact
    part.write_bytes(bytes(data))
    assert check_recorded(part) is None  # the cheap check cannot see it: the read must
    with pytest.raises(DamagedFile, match=str(part)):
        read_parquet(part)


def test_filesystem_failures_are_one_line():
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/prepared/x.parquet")
    assert filesystem_failure(RuntimeError("task failed")) is None
    wrapped = RuntimeError("a Ray task failed")
    wrapped.__cause__ = full
    assert filesystem_failure(wrapped) == ("/data/out/prepared/x.parquet: no space left on device. Free space there, "
                                           "or point run.output_dir / embed.store_dir elsewhere, then run the same "
                                           "command again to resume.")
    # pyarrow puts the errno in the message, not in e.errno
    arrow = OSError("Error writing bytes to file. Detail: [errno 30] Read-only file system")
    assert filesystem_failure(arrow).startswith("read-only file system. Remount it read-write")
    assert filesystem_failure(ValueError("bad value")) is None


def _fake_lease(root, age: float = 0.0, **kw):
    """Another run's lease: this machine's by default, last renewed ``age`` seconds ago."""
    doc = {"token": "x", "run": "r0", "owner": "someone", "host": socket.gethostname(), "pid": os.getpid(),
           "boot": publish._boot_id(), "pidns": publish._pid_namespace(), "started": "then", **kw}
    path = root / publish.LOCK
    path.write_text(json.dumps(doc))
    os.utime(path, (time.time() - age, time.time() - age))


def test_lease_refuses_a_live_holder_and_breaks_a_dead_one(tmp_path):
    with OutputLock(tmp_path, "a") as held:
        with pytest.raises(OutputBusy, match=r"being written by another run: run a of .* \(pid %d" % os.getpid()):
            OutputLock(tmp_path, "b").acquire()
        assert json.loads((tmp_path / ".lock").read_text())["token"] == held.token
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _fake_lease(tmp_path, pid=int(dead.stdout))  # its process on this machine is gone
    OutputLock(tmp_path, "c").acquire().release()
    # a container on the host network: the same host name, another pid namespace; its pid means nothing here
    _fake_lease(tmp_path, pid=int(dead.stdout), pidns="pid:[1]")
    with pytest.raises(OutputBusy, match="last heartbeat 0 s ago"):
        OutputLock(tmp_path, "d").acquire()
    _fake_lease(tmp_path, host="elsewhere", age=10)  # another host, heartbeat fresh
    with pytest.raises(OutputBusy, match="on elsewhere"):
        OutputLock(tmp_path, "d", stale_s=300).acquire()
    t0 = time.time()
    with pytest.raises(OutputBusy, match="after waiting run.lock_wait_s"):
        OutputLock(tmp_path, "d", stale_s=300, wait_s=1).acquire()
    assert time.time() - t0 >= 1
    _fake_lease(tmp_path, host="elsewhere", age=400)  # another host, silent too long
    lock = OutputLock(tmp_path, "e", stale_s=300).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["run"] == "e"
    lock.release()


def test_a_lease_that_cannot_be_written_is_not_left_behind(tmp_path):
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(tmp_path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (tmp_path / "ballast").write_bytes(b"x" * 4096)  # the disk is full before the run starts
        with pytest.raises(OSError) as e:
            OutputLock(tmp_path, "a").acquire()
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / ".lock")
        assert not (tmp_path / ".lock").exists()
    finally:
        subprocess.run(["umount", "-l", str(tmp_path)], capture_output=True)


def test_heartbeat_renews_and_notices_a_taken_lease(tmp_path):
    lock = OutputLock(tmp_path, "a", heartbeat_s=0.05).acquire()
    path = tmp_path / ".lock"
    os.utime(path, (time.time() - 100, time.time() - 100))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 1 and not lock.lost  # renewed
    os.rename(path, tmp_path / "old")  # another run broke it and took a fresh one
    _fake_lease(tmp_path, token="someone else's", age=100)
    time.sleep(0.3)
    assert lock.lost and time.time() - path.stat().st_mtime > 99  # the renewal never touches the new lease
    lock.release()
    assert json.loads(path.read_text())["token"] == "someone else's"  # not ours to remove


def _attempt(root, run_id, status="complete", files=("selected.jsonl", "manifest.json")):
    d = root / publish.RUNS / run_id
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_text(json.dumps({"status": status, "run": run_id}) if f == "manifest.json" else run_id)
    return d


def test_publish_swaps_one_link_and_prune_keeps_the_newest(tmp_path):
    for f in ("selected.jsonl", "prototype.safetensors", "notes.txt"):  # written in place by an older version
        (tmp_path / f).write_text("old layout")
    a = _attempt(tmp_path, "20260101T000000Z-a", files=("selected.jsonl", "manifest.json", "explain.md"))
    publish.publish(tmp_path, a)
    assert not (tmp_path / "prototype.safetensors").exists()  # an old output this run does not write
    assert (tmp_path / "notes.txt").read_text() == "old layout"  # not ours: kept
    assert (tmp_path / "selected.jsonl").read_text() == a.name and os.readlink(tmp_path / "current") == f"runs/{a.name}"
    assert (tmp_path / "explain.md").read_text() == a.name
    b = _attempt(tmp_path, "20260102T000000Z-b")
    publish.publish(tmp_path, b)
    assert (tmp_path / "selected.jsonl").read_text() == b.name
    assert not (tmp_path / "explain.md").exists() and not (tmp_path / "explain.md").is_symlink()  # b has none
    assert publish.published_manifest(tmp_path)["run"] == b.name
    c = _attempt(tmp_path, "20260103T000000Z-c")
    unfinished = _attempt(tmp_path, "20260104T000000Z-d", status="running")
    publish.publish(tmp_path, c)
    removed = publish.prune(tmp_path, keep=2)
    assert sorted(removed) == [a.name, unfinished.name]
    assert sorted(p.name for p in (tmp_path / publish.RUNS).iterdir()) == [b.name, c.name]


def test_layout_problems_are_found_before_any_work(tmp_path):
    publish.check_layout(tmp_path)
    (tmp_path / "current").mkdir()
    with pytest.raises(publish.PublishError, match="current is not the link this layout publishes through"):
        publish.check_layout(tmp_path)
    (tmp_path / "current").rmdir()
    (tmp_path / "runs").write_text("")
    with pytest.raises(publish.PublishError, match="runs is a file"):
        publish.check_layout(tmp_path)
