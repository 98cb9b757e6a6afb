"""A real multi-node Ray cluster on this machine, for tests: a head and worker nodes, each a
`ray start --block` of its own, started and stopped by pid (never `ray stop`, which stops every
Ray on the host)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_pids(session: int) -> list[int]:
    """Live processes of one session: a `ray start --block` we started and all it started."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
                if os.getsid(int(entry)) == session and state != "Z":  # zombies are gone
                    pids.append(int(entry))
            except (OSError, IndexError):  # ended meanwhile
                pass
    return pids


def stop_session(session: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Stop only what one `ray start` of ours started, by pid."""
    deadline = time.monotonic() + 30
    for current in (sig, signal.SIGKILL):
        for pid in session_pids(session):
            try:
                os.kill(pid, current)
            except ProcessLookupError:
                pass
        while session_pids(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_pids(session):
            return
    assert not session_pids(session), "processes of the test's Ray node survived SIGKILL"


def _command(pid: int) -> bytes:
    """The program a process runs; empty once it has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return b""


class RayCluster:
    """`ray start --head` plus `ray start --address` nodes, each in its own session.

    Every node gets a custom resource named after it, so a test can tell nodes apart, and the
    environment `node_env` (e.g. a test-only hook) for the workers it starts.
    """

    def __init__(self, root: Path, node_env: dict[str, str] | None = None,
                 object_store_memory: int = 100_000_000):
        self.root = root
        # Each node's object store: what does not fit would spill, which conftest forbids.
        self.object_store_memory = object_store_memory
        # Ray 2.60's head wants token authentication; a fresh machine has no
        # ~/.ray/auth_token, so this cluster gets its own token, shared through the environment.
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        PATH=f"{Path(RAY).parent}:{os.environ['PATH']}", **(node_env or {}))
        self.env.pop("RAY_ADDRESS", None)
        self.port = free_port()
        self.dashboard_port = free_port()
        self.nodes: dict[str, subprocess.Popen] = {}

    @property
    def address(self) -> str:
        """The GCS address a driver joins with RAY_ADDRESS."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        """The address `ray job submit` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """The environment of a driver on this cluster (`fc7 extract` with RAY_ADDRESS)."""
        return dict(self.env, RAY_ADDRESS=self.address)

    def start_head(self, cpus: int = 0, dashboard: bool = False) -> None:
        self._start("head", [
            "--head", f"--port={self.port}", f"--num-cpus={cpus}",
            f"--include-dashboard={str(dashboard).lower()}",
            f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
        ])

    def add_node(self, name: str, cpus: int = 1) -> None:
        self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}"])

    def _start(self, name: str, args: list[str]) -> None:
        log_path = self.root / f"{name}.log"
        with open(log_path, "wb") as log:
            self.nodes[name] = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                 f"--object-store-memory={self.object_store_memory}",
                 f"--resources={json.dumps({name: 1})}", *args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            assert self.nodes[name].poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"Ray node {name} did not start in time"
            time.sleep(0.5)

    def raylet_pid(self, name: str) -> int:
        for pid in session_pids(self.nodes[name].pid):
            if _command(pid).endswith(b"/raylet"):
                return pid
        raise AssertionError(f"no raylet process in Ray node {name}")

    def live_workers(self) -> list[str]:
        """The worker nodes whose raylet still runs, in the order they were added."""
        alive = []
        for name in self.nodes:
            if name != "head" and any(
                _command(pid).endswith(b"/raylet") for pid in session_pids(self.nodes[name].pid)
            ):
                alive.append(name)
        return alive

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's raylet, as a lost machine or a spot preemption would."""
        os.kill(self.raylet_pid(name), signal.SIGKILL)

    def stop(self, forget: bool = True) -> None:
        """Stop every node we started (SIGKILL, as a crash would); with `forget`, also the
        record of our head that Ray leaves in its temp folder."""
        for name in reversed(list(self.nodes)):
            stop_session(self.nodes[name].pid, signal.SIGKILL)
            self.nodes[name].wait(timeout=30)
        if not forget:
            return
        # Leave no record of our dead head for the next `ray.init()` on this machine (but
        # keep one that names another cluster).
        record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if record.is_file() and record.read_text().strip().endswith(f":{self.port}"):
            record.unlink()


@contextmanager
def two_worker_nodes(root: Path, node_env: dict[str, str] | None = None) -> Iterator[RayCluster]:
    """A head with no CPUs and two worker nodes of one CPU, `node_a` and `node_b`: every Ray
    worker runs on another node than the driver, as on a cluster. Stopped on exit."""
    cluster = RayCluster(root, node_env)
    try:
        cluster.start_head(cpus=0)
        cluster.add_node("node_a")
        cluster.add_node("node_b")
        yield cluster
    finally:
        cluster.stop()
