"""Scaling: what a swarm commits against what the same cores compute as solo peers, measured in one run.

Every figure is a committed rate: swarm steps the peers' own ``swarm step`` lines show, times the target batch,
per second, over a window that starts at the first committed step (start-up, DHT and the first round are outside it).
Samples a peer trained past a step that never committed do not count. Phases, one after the other, same config:

- ``one``: 1 peer alone, on core 0;
- ``solo``: N peers at once, each a swarm of its own (its own run id), peer i on core i mod cores: what these cores
  compute at all, with their cache and memory bandwidth shared as in the swarm (on a VM the limit moves by run);
- ``swarm``: the same N peers in one swarm, pinned the same way;
- ``unpinned`` (with ``--unpinned``): the swarm again, started as a user would (no ``taskset``, each peer choosing its
  own threads).

Swarm efficiency = swarm / solo. The contributed-samples figure of earlier reports (samples a peer trained, committed
or not) is kept beside it as ``contributed_samples_per_s``, named as such.

    python -m benchmarks.scaling [--peers 2] [--window 150] [--unpinned] [--config digits_tiny_diloco]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from vitpeer.peer.commands.demo import start_logged
from vitpeer.peer.core.config import load_config
from vitpeer.peer.core.runtime.processes import stop_all

STEP_LINE = re.compile(r"^(\d\d:\d\d:\d\d) vitpeer swarm step (\d+)/\d+ .*?this peer (\d+) samples/s", re.M)
JOIN_HINT = re.compile(r"others join with: .*--initial-peers (\S+)")


def clock(text: str) -> float:
    """A log line's HH:MM:SS as seconds since midnight (runs here do not cross midnight's hour: see ``committed``)."""
    parsed = datetime.strptime(text, "%H:%M:%S")
    return parsed.hour * 3600 + parsed.minute * 60 + parsed.second


def committed(log: Path, target: int) -> dict[str, float]:
    """A peer's committed rate from its log: swarm steps from its first step line to its last, times ``target``,
    over the seconds between them; with its own last reported compute rate ("this peer ... samples/s")."""
    lines = [(clock(t), int(step), int(rate)) for t, step, rate in STEP_LINE.findall(log.read_text())]
    if len(lines) < 3:
        raise RuntimeError(f"{log}: {len(lines)} swarm steps in the window, too few to measure; see the log")
    (t0, s0, _), (t1, s1, _) = lines[0], lines[-1]
    seconds = (t1 - t0) % 86400
    contributed = sum(rate for _, _, rate in lines) / len(lines)
    return {
        "steps": s1 - s0,
        "seconds": seconds,
        "samples_per_s": (s1 - s0) * target / seconds,
        "own_rate": contributed,
    }


def run_phase(
    name: str, peers: int, config: str, out: Path, window: float, swarm: bool, pinned: bool, threads: int | None
) -> dict[str, Any]:
    """``peers`` ``vitpeer join`` processes (in one swarm or each alone), stopped ``window`` s after the first
    committed step; their committed rates."""
    cores = os.cpu_count() or 1
    target = load_config(config).swarm.target_batch_size
    processes, logs = [], []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)  # a peer chooses its own threads unless --threads says
    initial: str | None = None
    try:
        for index in range(peers):
            peer_dir = out / name / f"peer-{index + 1}"
            peer_dir.mkdir(parents=True)
            command = [sys.executable, "-m", "vitpeer.peer.cli", "join", "--config", config]
            command += ["--output-dir", str(peer_dir), "--max-steps", "100000", "--host-maddr", "/ip4/127.0.0.1/tcp/0"]
            command += ["--run-id", f"bench-{name}" + ("" if swarm else f"-{index + 1}")]
            if threads is not None:
                command += ["--threads", str(threads)]
            if swarm and initial is not None:
                command += ["--initial-peers", initial]
            if pinned:
                command = ["taskset", "--cpu-list", str(index % cores), *command]
            log = peer_dir / "log.txt"
            process, _ = start_logged(command, env, f"{name} {index + 1}", log, shown=re.compile("^$"))
            processes.append(process)
            logs.append(log)
            if swarm and initial is None:  # the others meet at the first peer, as volunteers would
                deadline = time.monotonic() + 120
                while initial is None and time.monotonic() < deadline and process.poll() is None:
                    found = JOIN_HINT.search(log.read_text()) if log.is_file() else None
                    initial = found.group(1) if found else None
                    time.sleep(0.2)
                if initial is None:
                    raise RuntimeError(f"{name}: the first peer printed no join hint; see {log}")
        deadline = time.monotonic() + 180
        while not all(STEP_LINE.search(log.read_text()) for log in logs if log.is_file()):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError(f"{name}: a peer committed no step within 180 s or exited; see {out / name}")
            time.sleep(0.5)
        time.sleep(window)
        for process in processes:
            process.send_signal(signal.SIGTERM)
    finally:
        stop_all(processes)
    rates = [committed(log, target) for log in logs]
    if swarm:  # one swarm: every peer logged the same steps, over windows a second apart at most; their mean
        total = sum(rate["samples_per_s"] for rate in rates) / len(rates)
    else:
        total = sum(rate["samples_per_s"] for rate in rates)
    return {
        "peers": peers,
        "pinned": pinned,
        "committed_samples_per_s": total,
        "contributed_samples_per_s": sum(rate["own_rate"] for rate in rates),
        "per_peer": rates,
    }


def run(
    config: str = "digits_tiny_diloco",
    peers: int = 2,
    window: float = 150.0,
    unpinned: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vitpeer-scaling-") as tmp:
        out = Path(tmp)
        one = run_phase("one", 1, config, out, window, True, True, threads)
        solo = run_phase("solo", peers, config, out, window, False, True, threads)
        swarm = run_phase("swarm", peers, config, out, window, True, True, threads)
        result = {"config": config, "peers": peers, "window_s": window, "one": one, "solo": solo, "swarm": swarm}
        result["speedup"] = swarm["committed_samples_per_s"] / one["committed_samples_per_s"]
        result["efficiency"] = swarm["committed_samples_per_s"] / solo["committed_samples_per_s"]
        if unpinned:
            free = run_phase("unpinned", peers, config, out, window, True, False, threads)
            result["unpinned"] = free
            result["unpinned_over_pinned"] = free["committed_samples_per_s"] / swarm["committed_samples_per_s"]
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="digits_tiny_diloco")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--window", type=float, default=150.0, help="seconds measured in each phase")
    parser.add_argument("--unpinned", action="store_true", help="also the swarm without taskset")
    parser.add_argument("--threads", type=int, default=None, help="pass --threads to every peer")
    args = parser.parse_args()
    print(json.dumps(run(args.config, args.peers, args.window, args.unpinned, args.threads), indent=2))
