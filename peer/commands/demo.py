"""``vitpeer demo``: a real swarm on 127.0.0.1 — a ``vitpeer coordinator`` (or a bare bootstrap DHT node), N
``vitpeer join`` processes.

Each peer is the same command a volunteer runs, pointed at the coordinator (``--coordinator URL``) or the bootstrap
node, listening on loopback only and given an equal share of this host's cores. Their progress lines are shown with a
``[peer i]`` prefix, the coordinator's checkpoints with ``[coordinator]``; full logs stay in
``<output-dir>/peer-i/log.txt`` and ``<output-dir>/coordinator/log.txt``. The coordinator serves its live page on
127.0.0.1 at a free port, printed at the start. Every child is stopped and reaped on any exit.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import hivemind

from vitpeer.peer.core.runtime.processes import stop_all

OUR_LINE = re.compile(r"^\d\d:\d\d:\d\d vitpeer ")  # the format core.config.options.setup_logging gives our own records
CHECKPOINT_EVERY = 10
"""Swarm steps between the demo coordinator's checkpoints (the demo config trains 30): its page shows three
evaluations and offers the best model for download."""


def peer_command(
    config: str,
    initial_peers: list[str],
    output_dir: Path,
    max_steps: int | None,
    module: str = "vitpeer.peer.cli",
    coordinator: str | None = None,
) -> list[str]:
    """``vitpeer join`` on loopback, meeting the swarm through ``coordinator`` (its URL) or ``initial_peers``."""
    command = [sys.executable, "-m", module, "join", "--config", config, "--output-dir", str(output_dir)]
    command += ["--host-maddr", "/ip4/127.0.0.1/tcp/0"]
    command += ["--coordinator", coordinator] if coordinator else ["--initial-peers", ",".join(initial_peers)]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    return command


def relay(name: str, stream, log_file: Path, shown: re.Pattern[str] | None = None) -> None:
    """Copy a peer's output to its log file; echo our own progress lines (those matching ``shown``, when given),
    prefixed with ``[name]``."""
    with log_file.open("w") as sink:
        for line in stream:
            sink.write(line)
            sink.flush()
            if OUR_LINE.match(line):
                message = line.split(" vitpeer ", 1)[1]
                if shown is None or shown.search(message):
                    print(f"[{name}] {message}", end="", flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def coordinator_command(config: str, state_dir: Path, dht_port: int, http_port: int) -> list[str]:
    """``vitpeer coordinator`` on loopback: its DHT node is the swarm's meeting point, its HTTP port the page's."""
    command = [sys.executable, "-m", "vitpeer.peer.cli", "coordinator", "--config", config]
    command += ["--state-dir", str(state_dir), "--host-maddr", f"/ip4/127.0.0.1/tcp/{dht_port}"]
    command += ["--http-host", "127.0.0.1", "--http-port", str(http_port)]
    return command + ["--checkpoint-every-steps", str(CHECKPOINT_EVERY)]


def start_logged(command: list[str], env: dict[str, str], name: str, log_file: Path, shown=None):
    """``command`` with its output relayed (``relay``) by a daemon thread; returns (process, thread)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    echo = threading.Thread(target=relay, args=(name, process.stdout, log_file, shown), daemon=True)
    echo.start()
    return process, echo


def run_demo(
    peers: int,
    config: str,
    output_dir: Path,
    max_steps: int | None = None,
    module: str = "vitpeer.peer.cli",
    pin_cores: bool = False,
    extra_args: Sequence[str] = (),
    coordinator: bool = False,
) -> float | None:
    """Run the local swarm to the end; return the peers' mean test accuracy, or None if a peer failed. ``module``:
    what each peer runs with ``python -m`` (the benchmarks use a timed ``vitpeer``); ``pin_cores``: peer i runs on
    core i alone (``taskset``), one thread, as volunteers on separate machines would (``benchmarks.scaling``);
    ``extra_args``: more ``vitpeer join`` options for every peer (``--seed 1``); ``coordinator``: the swarm meets at a
    ``vitpeer coordinator`` with its live page (``vitpeer demo``), else at a bare DHT node (the benchmarks)."""
    started = time.monotonic()
    cores = os.cpu_count() or 1
    threads = 1 if pin_cores else max(1, cores // peers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    processes, relays = [], []
    bootstrap, initial_peers, url = None, [], None
    if coordinator:
        url = f"http://127.0.0.1:{free_port()}"
        print(f"demo: {peers} peers on 127.0.0.1 and a coordinator; watch them at {url}/", flush=True)
        print(f"demo: or in this terminal: vitpeer status {url}", flush=True)
    else:
        bootstrap = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        initial_peers = [str(addr) for addr in bootstrap.get_visible_maddrs()]
        print(f"demo: {peers} peers on 127.0.0.1, meeting at {initial_peers[0]}", flush=True)
    served = []  # the coordinator: stopped once the peers are done
    try:
        if url is not None:
            state_dir = output_dir / "coordinator"
            state_dir.mkdir(parents=True, exist_ok=True)
            command = coordinator_command(config, state_dir, free_port(), int(url.rsplit(":", 1)[1]))
            shown = re.compile(r"^checkpoint |^live page")
            process, echo = start_logged(command, env, "coordinator", state_dir / "log.txt", shown)
            served.append(process)
        for index in range(1, peers + 1):
            peer_dir = output_dir / f"peer-{index}"
            peer_dir.mkdir(parents=True, exist_ok=True)
            command = [*peer_command(config, initial_peers, peer_dir, max_steps, module, url), *extra_args]
            if pin_cores:
                command = ["taskset", "--cpu-list", str((index - 1) % cores), *command]
            process, echo = start_logged(command, env, f"peer {index}", peer_dir / "log.txt")
            processes.append(process)
            relays.append(echo)
        codes = [process.wait() for process in processes]
        for echo in relays:
            echo.join(timeout=5)
    finally:
        stop_all([*processes, *served])
        if bootstrap is not None:
            bootstrap.shutdown()

    accuracies = []
    for index, code in enumerate(codes, start=1):
        results = output_dir / f"peer-{index}" / "all_results.json"
        if code != 0 or not results.is_file():
            tail = (output_dir / f"peer-{index}" / "log.txt").read_text().splitlines()[-15:]
            print(f"demo: peer {index} failed (exit code {code}); last lines of its log:", *tail, sep="\n  ")
            return None
        accuracies.append(json.loads(results.read_text())["test_accuracy"])
    mean = sum(accuracies) / len(accuracies)
    shown = ", ".join(f"{acc:.3f}" for acc in accuracies)
    print(f"demo: final test accuracy {mean:.3f} (peers: {shown}) in {time.monotonic() - started:.0f} s", flush=True)
    return mean
