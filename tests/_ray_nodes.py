"""Real Ray nodes on 127.0.0.1 for the tests that submit jobs (test_launch, test_cluster): each
node is its own `ray start --block` process group (GCS / raylet / object store / workers) with
ports picked free, under its own temp folder; stopped (or killed) by its process group only,
never by `ray stop`, which would stop every Ray on the machine."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_cli(bin_dir: Path) -> None:
    """A `ray` on PATH that runs this interpreter's Ray (the one pytest imports)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "ray").write_text(
        "#!/bin/sh\nexec " + shlex.quote(sys.executable)
        + " -c 'import sys; from ray.scripts.scripts import main; sys.argv[0] = \"ray\"; sys.exit(main())' \"$@\"\n")
    (bin_dir / "ray").chmod(0o755)


class Node:
    """One `ray start --block` process group."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> set[int]:
        """Every live process of this node: its `ray start` process group (GCS, raylet, agents)
        and their descendants (Ray's worker processes, the actors, run in sessions of their own)."""
        parent, group = {}, set()
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(d.name)] = int(fields[1])  # field 4: the parent
                if int(fields[2]) == self.proc.pid:  # field 5: the process group
                    group.add(int(d.name))
        out, grew = set(group), True
        while grew:
            more = {p for p, pp in parent.items() if pp in out and p not in out}
            out |= more
            grew = bool(more)
        return out

    def kill(self) -> set[int]:
        """SIGKILL the node's process group and every process under it at once, as a machine
        dying would; returns their pids."""
        pids = self.pids()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        return pids

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            time.sleep(2)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of the group still alive
        except ProcessLookupError:
            pass
        self._log.close()


def _node_ports(lo: int) -> list[str]:
    nm, om, al, ag, rt, mx = free_ports(6)
    return [f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={al}",
            f"--dashboard-agent-grpc-port={ag}", f"--runtime-env-agent-port={rt}", f"--metrics-export-port={mx}",
            f"--min-worker-port={lo}", f"--max-worker-port={lo + 19}"]


class Cluster:
    """A head (with the dashboard: the Jobs API) and any number of worker nodes, all `ray start`
    processes on 127.0.0.1; ``address`` is the Jobs API, ``env`` runs `ray` / submit.sh against it."""

    def __init__(self, work: Path, env_extra: dict | None = None):
        self.work = work
        bin_dir = work / "bin"
        ray_cli(bin_dir)
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_agent_register_timeout_ms": "180000", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",  # a busy machine
                    **(env_extra or {})}
        self.nodes: list[Node] = []
        self._lo = 20000 + (os.getpid() % 1000) * 40
        self.gcs = self.address = None

    def _worker_ports(self) -> int:
        lo, self._lo = self._lo, self._lo + 20
        return lo

    def start_head(self, num_cpus: int, timeout: float = 600) -> Node:
        gcs, dash = free_ports(2)
        cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               f"--num-cpus={num_cpus}", *_node_ports(self._worker_ports()), f"--temp-dir={self.work / 'ray'}"]
        node = Node(cmd, self.env, self.work / "head.log")
        self.nodes.append(node)
        self.gcs, self.address = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        deadline = time.time() + timeout
        while not self._answers():
            if node.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head did not come up:\n{node.log_path.read_text()[-3000:]}")
            time.sleep(2)
        self.wait_nodes(1, timeout)  # the dashboard can answer before the head's raylet has registered
        return node

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.address}/api/version", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def add_worker(self, num_cpus: int, resources: dict | None = None, memory: int | None = None) -> Node:
        i = len(self.nodes)
        cmd = ["ray", "start", "--block", f"--address={self.gcs}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", *_node_ports(self._worker_ports()), f"--temp-dir={self.work / 'ray'}"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if memory:
            cmd.append(f"--memory={int(memory)}")
        alive = max(self.alive_nodes(), len(self.nodes))
        node = Node(cmd, self.env, self.work / f"worker{i}.log")
        self.nodes.append(node)
        self.wait_nodes(alive + 1)  # one at a time: nodes starting together on one host race for socket names
        return node

    def job(self, submission_id: str) -> dict:
        """The Jobs API's record of a job (``status``: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
        with urllib.request.urlopen(f"{self.address}/api/jobs/{submission_id}", timeout=10) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> int:
        """Nodes the head reports alive (-1: the dashboard did not answer, e.g. still starting)."""
        try:
            with urllib.request.urlopen(f"{self.address}/nodes?view=summary", timeout=10) as r:
                summary = json.loads(r.read())["data"]["summary"]
        except (OSError, ValueError, KeyError):
            return -1
        return sum(n["raylet"]["state"] == "ALIVE" for n in summary)

    def wait_nodes(self, n: int, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while self.alive_nodes() != n:
            if time.time() > deadline or any(node.proc.poll() is not None for node in self.nodes):
                raise RuntimeError(f"{self.alive_nodes()} Ray nodes alive, not {n}")
            time.sleep(1)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
