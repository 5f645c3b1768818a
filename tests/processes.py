"""Starting real vitpeer processes in tests: coordinators and peers on 127.0.0.1, their logs, their addresses.

Shared by the multi-process tests (``tests/coordinator``, ``tests/monitor``); importable because pytest puts
``tests/`` (the root conftest's directory) on ``sys.path``. Callers stop what they start with the library's
``vitpeer.peer.core.runtime.processes.stop_all`` in a ``finally`` block (``grace=STOP_GRACE`` where the test has
judged everything it needs from them); the session fixture in ``conftest.py`` reaps anything left.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CONFIG = "digits_tiny_gradient"
RUN_ID = "vitpeer-digits-gradient"  # digits_tiny_gradient's run id
METRICS_AT = r"metrics for Prometheus at (http://\S+)"  # what join and monitor print once their exporter listens
STOP_GRACE = 2.0
"""Seconds a test's processes get to exit on SIGTERM once the test is done with them, then SIGKILL (their hivemind
processes and p2p daemons die with them: ``children_die_with_us``). A peer's clean leave can take its whole deadline
and goodbye, 9 s, when the peers it averages with are stopped at the same moment (seen at the end of
test_prometheus.py and of the coordinator's diloco run); the tests that judge a leave (test_leave.py) do not use it."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5, log: Path | None = None) -> Any:
    """``check()``'s first true value within ``timeout`` s; on time-out, an error that ends with ``log``'s last lines
    (what the awaited process was doing: CI keeps no files)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log is not None and log.is_file() else ""
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f"; {log} ends:\n{tail}" if tail else "")
    )


def spawn(
    command: list[str], log: Path, module: str = "vitpeer.peer.cli", prefix: Sequence[str] = (), **env: str
) -> subprocess.Popen:
    """``python -m module command...`` (the ``vitpeer`` command by default; ``hostile`` for one with test faults),
    stdout and stderr appended to ``log``; ``prefix`` runs it through another command (``ip netns exec NAME``)."""
    tests = str(Path(__file__).resolve().parent)  # where ``hostile`` lives
    path = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    with log.open("a") as sink:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", module, *command],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **env},
        )


class Coordinator:
    """``vitpeer coordinator`` on loopback (DHT at ``dht_port``, HTTP on a free port) running ``config``,
    checkpointing every ``checkpoint_every`` swarm steps."""

    def __init__(
        self, state_dir: Path, dht_port: int, log: Path, config: str | Path = CONFIG, checkpoint_every: int = 6
    ):
        self.state_dir, self.dht_port, self.log = state_dir, dht_port, log
        self.config, self.checkpoint_every = str(config), checkpoint_every
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, **env: str) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        command = ["coordinator", "--config", self.config, "--state-dir", str(self.state_dir)]
        command += ["--host-maddr", f"/ip4/127.0.0.1/tcp/{self.dht_port}", "--http-host", "127.0.0.1"]
        command += ["--http-port", "0", "--checkpoint-every-steps", str(self.checkpoint_every), "--keep-last", "3"]
        command += ["--download-timeout", "30"]
        self.process = spawn(command, self.log, **env)

        def url() -> str | None:
            found = re.search(r"HTTP API at (http://\S+)", self.log.read_text()[offset:])
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            return found.group(1) if found else None

        self.url = wait_for("the coordinator's HTTP address", url, timeout=90)

    def status(self) -> dict[str, Any]:
        return json.loads(fetch(f"{self.url}/status"))


def peer(index: int, tmp_path: Path, coordinator: Coordinator, *extra: str) -> subprocess.Popen:
    """``vitpeer join --coordinator URL`` writing to ``tmp_path/peer-<index>/``, with ``extra`` flags."""
    out = tmp_path / f"peer-{index}"
    out.mkdir(exist_ok=True)
    command = ["join", "--coordinator", coordinator.url, "--output-dir", str(out), "--max-steps", "10000"]
    command += ["--host-maddr", "/ip4/127.0.0.1/tcp/0", *extra]
    return spawn(command, out / "log.txt")


def listed(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {report["peer_id"]: report for report in status["peers"]}


def printed(log: Path, pattern: str) -> str | None:
    """The first group of ``pattern`` in a process's log, once it has printed it."""
    found = re.search(pattern, log.read_text()) if log.is_file() else None
    return found.group(1) if found else None


def peer_id(tmp_path: Path, index: int) -> str | None:
    """The peer id a running peer printed in its join hint (the /p2p/ part of its address)."""
    return printed(tmp_path / f"peer-{index}" / "log.txt", r"others join with: .*?/p2p/(\w+)")


def rejoin(
    peers: list[subprocess.Popen], index: int, tmp_path: Path, coordinator: Coordinator, past: int, timeout: float
) -> int:
    """Start peer ``index`` against ``coordinator`` (added to ``peers``, which the caller stops) and wait until it has
    loaded the swarm's state and trained on past swarm step ``past`` (within ``timeout`` s); the step it loaded."""
    peers.append(peer(index, tmp_path, coordinator))
    log = tmp_path / f"peer-{index}" / "log.txt"
    loaded = wait_for(
        f"peer {index} to load the state", lambda: printed(log, r"loaded the swarm's state at step (\d+)"), 90, log=log
    )
    joined = wait_for(f"peer {index}'s id", lambda: peer_id(tmp_path, index), 10)
    wait_for(
        f"peer {index} to train on past swarm step {past}",
        lambda: listed(coordinator.status()).get(joined, {}).get("step", -1) > past,
        timeout,
        every=1,
        log=log,
    )
    return int(loaded)
