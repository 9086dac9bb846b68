"""Shared fixtures: a real two-node Ray cluster on loopback (head 127.0.0.2, worker 127.0.0.3).

Ray swaps 127.0.0.1 for the machine's external address, so other loopback addresses are
used; token authentication is shared through one token file (see ../shared/STACK.md of the
project notes). Nodes are stopped by PID, never with `ray stop`, so other Ray users on the
machine are left alone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


def pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (the cluster's temp dir)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="ignore"):
                    found.append(int(p.name))
            except OSError:
                pass
    return found


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    tmp: str
    node_pids: dict[str, list[int]] = field(default_factory=dict)

    def kill_node(self, ip: str) -> None:
        for pid in self.node_pids.get(ip, []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        for pid in pids_using(self.tmp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_cluster(**cpus: int) -> Cluster:
    """Start head and worker (``head_cpus``/``worker_cpus``, 1 each by default)."""
    tmp = tempfile.mkdtemp(prefix="qsr", dir="/tmp")
    token = Path(tmp) / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        return _start(tmp, env, **cpus)
    except BaseException:
        Cluster("", env, tmp).stop()
        raise


def _start(tmp: str, env: dict[str, str], *, head_cpus: int = 1,
           worker_cpus: int = 1) -> Cluster:
    port = free_port()
    common = [f"--temp-dir={tmp}",
              "--object-store-memory=200000000", f"--memory={2 * 1024**3}"]
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.2",
                    f"--num-cpus={head_cpus}", "--include-dashboard=false",
                    "--min-worker-port=21000", "--max-worker-port=21999", *common],
                   env=env, check=True, capture_output=True, timeout=120)
    head_pids = set(pids_using(tmp))
    subprocess.run([RAY, "start", f"--address=127.0.0.2:{port}",
                    "--node-ip-address=127.0.0.3", f"--num-cpus={worker_cpus}",
                    "--min-worker-port=22000", "--max-worker-port=22999", *common],
                   env=env, check=True, capture_output=True, timeout=120)
    time.sleep(2)
    worker_pids = [p for p in pids_using(tmp) if p not in head_pids]
    return Cluster(f"127.0.0.2:{port}", env, tmp,
                   {"127.0.0.2": sorted(head_pids), "127.0.0.3": worker_pids})


@pytest.fixture
def ray_cluster():
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
