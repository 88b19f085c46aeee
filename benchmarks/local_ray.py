"""A real local Ray cluster for benchmarks and tests: `ray start --head` on 127.0.0.1 with a
given number of CPUs, always stopped. Its temporary folder is short (under /tmp): Ray's unix
sockets live under it, and a socket path has at most 107 characters."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


@contextlib.contextmanager
def local_cluster(cpus: int = 2, timeout_s: float = 180) -> Iterator[str]:
    """Start a cluster of one node with `cpus` CPUs on a free port; yields its HOST:PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        started = subprocess.run([*RAY, "start", "--head", "--num-cpus", str(cpus), "--port", str(port),
                                  "--node-ip-address", "127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
                                  "--temp-dir", temp], capture_output=True, text=True, timeout=timeout_s, env=env)
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed: {started.stderr[-2000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([*RAY, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)
