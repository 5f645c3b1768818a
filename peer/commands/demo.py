"""``vitpeer demo``: a real swarm on 127.0.0.1 — a bootstrap DHT node here, N ``vitpeer join`` processes.

Each peer is the same command a volunteer runs, pointed at the bootstrap node, listening on loopback only and given
an equal share of this host's cores. Their progress lines are shown with a ``[peer i]`` prefix; full logs stay in
``<output-dir>/peer-i/log.txt``. Every child is stopped and reaped on any exit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import hivemind

from vitpeer.peer.core.processes import stop_all

OUR_LINE = re.compile(r"^\d\d:\d\d:\d\d vitpeer ")  # the format core.options.setup_logging gives our own records


def peer_command(
    config: str, initial_peers: list[str], output_dir: Path, max_steps: int | None, module: str = "vitpeer.peer.cli"
) -> list[str]:
    command = [sys.executable, "-m", module, "join", "--config", config, "--output-dir", str(output_dir)]
    command += ["--host-maddr", "/ip4/127.0.0.1/tcp/0", "--initial-peers", ",".join(initial_peers)]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    return command


def relay(name: str, stream, log_file: Path) -> None:
    """Copy a peer's output to its log file; echo our own progress lines, prefixed with ``[name]``."""
    with log_file.open("w") as sink:
        for line in stream:
            sink.write(line)
            sink.flush()
            if OUR_LINE.match(line):
                print(f"[{name}] {line.split(' vitpeer ', 1)[1]}", end="", flush=True)


def run_demo(
    peers: int,
    config: str,
    output_dir: Path,
    max_steps: int | None = None,
    module: str = "vitpeer.peer.cli",
    pin_cores: bool = False,
    extra_args: Sequence[str] = (),
) -> float | None:
    """Run the local swarm to the end; return the peers' mean test accuracy, or None if a peer failed. ``module``:
    what each peer runs with ``python -m`` (the benchmarks use a timed ``vitpeer``); ``pin_cores``: peer i runs on
    core i alone (``taskset``), one thread, as volunteers on separate machines would (``benchmarks.scaling``);
    ``extra_args``: more ``vitpeer join`` options for every peer (``--seed 1``)."""
    started = time.monotonic()
    bootstrap = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    initial_peers = [str(addr) for addr in bootstrap.get_visible_maddrs()]
    print(f"demo: {peers} peers on 127.0.0.1, meeting at {initial_peers[0]}", flush=True)
    cores = os.cpu_count() or 1
    threads = 1 if pin_cores else max(1, cores // peers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    processes, relays = [], []
    try:
        for index in range(1, peers + 1):
            peer_dir = output_dir / f"peer-{index}"
            peer_dir.mkdir(parents=True, exist_ok=True)
            command = [*peer_command(config, initial_peers, peer_dir, max_steps, module), *extra_args]
            if pin_cores:
                command = ["taskset", "--cpu-list", str((index - 1) % cores), *command]
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            processes.append(process)
            echo = threading.Thread(target=relay, args=(f"peer {index}", process.stdout, peer_dir / "log.txt"))
            echo.daemon = True
            echo.start()
            relays.append(echo)
        codes = [process.wait() for process in processes]
        for echo in relays:
            echo.join(timeout=5)
    finally:
        stop_all(processes)
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
