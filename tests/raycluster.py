"""A private Ray cluster for tests: `ray start` on this host, token auth on, cleaned up by PID.

Tests that submit jobs, stop nodes or kill drivers run here rather than on the session's shared
`ray.init`: `ray stop` would stop every Ray on the host, and a driver killed with SIGKILL can leave
processes that ignore SIGTERM (seen on Ray 2.60). Every node gets its own ports so several clusters and
nodes coexist on one host, and its own `--memory`/`--object-store-memory` so two nodes do not both
promise the whole machine.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY_BIN = str(Path(sys.executable).with_name("ray"))


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Worker port ranges live in [WORKER_LOW, WORKER_HIGH): above Ray's own default worker range
# (10002-19999, used by the session's `ray.init`) and below the ephemeral range, where every
# port from `_free_ports` comes from. A range drawn inside the ephemeral range can overlap a
# component port drawn for another node ("worker_ports is trying to use a port number ... that
# is used by other components").
NODE_PORTS = 50  # worker ports per node
BAND_PORTS = 4 * NODE_PORTS  # per cluster: a head and up to 3 nodes
WORKER_LOW = 20000
WORKER_HIGH = max(WORKER_LOW + BAND_PORTS, _ephemeral_low())
_bands = itertools.count(os.getpid())


def _next_worker_band() -> int:
    """First port of a band of BAND_PORTS, a different band for each cluster this process starts."""
    slots = (WORKER_HIGH - WORKER_LOW) // BAND_PORTS
    return WORKER_LOW + (next(_bands) % slots) * BAND_PORTS


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports the kernel says are free now, none inside the worker band."""
    sockets, ports = [], []
    while len(ports) < count:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("", 0))
        sockets.append(sock)
        port = sock.getsockname()[1]
        if not WORKER_LOW <= port < WORKER_HIGH:
            ports.append(port)
    for sock in sockets:
        sock.close()
    return ports


def _port_flags(ports: list[int]) -> list[str]:
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    return [f"{name}={port}" for name, port in zip(names, ports)]


class LocalRayCluster:
    """Head (and optional extra nodes) started with `ray start`; `env` reaches it with its token."""

    def __init__(self, head_cpus: float = 2, memory_gb: float = 6, object_store_gb: float = 0.5):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: unix socket paths
        self.token = secrets.token_hex(16)
        self.port, self.dashboard_port, self.client_port, *self._head_ports = _free_ports(9)
        self.head_cpus = head_cpus
        self.memory = int(memory_gb * 1e9)
        self.object_store = int(object_store_gb * 1e9)
        self.nodes: dict[str, set[int]] = {}
        worker_base = _next_worker_band()
        self._worker_ports = iter(range(worker_base, worker_base + BAND_PORTS, NODE_PORTS))

    @property
    def address(self) -> str:
        return f"{_node_ip()}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for drivers, `ray job submit` and nodes: the token and the project's venv on PATH."""
        env = dict(os.environ)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_ADDRESS=self.address,
            RAY_API_SERVER_ADDRESS=self.dashboard_url,
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            RAY_USAGE_STATS_ENABLED="0",
        )
        return env

    def _run(self, args: list[str]) -> None:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def _pids(self) -> set[int]:
        marker = str(self.temp_dir)
        found = set()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or []):
                    found.add(proc.pid)
                    found.update(child.pid for child in proc.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def start(self, resources: dict | None = None) -> LocalRayCluster:
        base = next(self._worker_ports)
        args = [RAY_BIN, "start", "--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}",
                f"--memory={self.memory}", f"--object-store-memory={self.object_store}",
                f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={self.client_port}",
                f"--min-worker-port={base}", f"--max-worker-port={base + NODE_PORTS - 1}", "--disable-usage-stats",
                *_port_flags(self._head_ports)]
        if resources:
            args.append(f"--resources={_json(resources)}")
        self._run(args)
        self.nodes["head"] = self._pids()
        self.wait_for_job_agent()
        return self

    def add_node(self, name: str, num_cpus: float, resources: dict | None = None,
                 memory_gb: float = 4, object_store_gb: float = 0.3) -> None:
        before = self._pids()
        base = next(self._worker_ports)
        args = [RAY_BIN, "start", f"--address={self.address}", f"--num-cpus={num_cpus}",
                f"--memory={int(memory_gb * 1e9)}", f"--object-store-memory={int(object_store_gb * 1e9)}",
                f"--min-worker-port={base}", f"--max-worker-port={base + NODE_PORTS - 1}", "--disable-usage-stats",
                *_port_flags(_free_ports(6))]
        if resources:
            args.append(f"--resources={_json(resources)}")
        self._run(args)
        self.nodes[name] = self._pids() - before

    def node_pids(self, name: str) -> set[int]:
        """The node's processes now, including workers started since it joined (raylet descendants)."""
        pids = set(self.nodes[name])
        for pid in list(pids):
            try:
                pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return pids

    def kill_node(self, name: str) -> None:
        """SIGKILL one node's raylet and everything under it, as a lost machine would look."""
        _kill(self.node_pids(name))

    def wait_for_job_agent(self, timeout: float = 90) -> None:
        """The job API answers only once the head's agent is up; `ray job list` tells when."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = subprocess.run([RAY_BIN, "job", "list", "--address", self.dashboard_url],
                                  env=self.env, capture_output=True, text=True, timeout=60)
            if proc.returncode == 0:
                return
            time.sleep(2)
        raise TimeoutError(f"Ray job API at {self.dashboard_url} did not come up within {timeout} s")

    def submit(self, entrypoint: list[str], working_dir: str, timeout: float = 900,
               token: str | None = None) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir DIR -- ENTRYPOINT`, waiting for the job to end."""
        env = self.env
        if token is not None:
            env["RAY_AUTH_TOKEN"] = token
        args = [RAY_BIN, "job", "submit", "--address", self.dashboard_url, "--working-dir", working_dir,
                "--", *entrypoint]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)

    def shutdown(self) -> None:
        _kill(self._pids() | {pid for pids in self.nodes.values() for pid in pids})
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        try:
            return self.start()
        except BaseException:
            self.shutdown()  # a start that failed half-way leaves processes: __exit__ will not run
            raise

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _json(resources: dict) -> str:
    return json.dumps(resources)


def _node_ip() -> str:
    # Ray publishes the node on the host's routable address even when asked for 127.0.0.1.
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _kill(pids: set[int]) -> None:
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGKILL)
            procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(procs, timeout=10)
