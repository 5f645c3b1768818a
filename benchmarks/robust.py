"""Robust aggregation: what one hostile volunteer does to a diloco swarm under each rule, and what a rule costs when
nobody lies.

For each rule (``mean``, ``centered_clip``, ``trimmed_mean``) a swarm of ``peers`` trains the demo config, once with
every peer honest and once per attack of ``benchmarks.attacks`` with one peer lying. Reported per run: the honest
peers' mean test accuracy (the liar's own is left out) and, for the clean runs, the seconds of an averaged round
(hand-off to result, the honest peers' mean) beside the whole run's seconds. Peers meet at a bare DHT node
(``run_demo`` without a coordinator); on a machine with fewer cores than peers they share them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hivemind

from benchmarks.attacks import ATTACKS
from vitpeer.peer.core.averaging.aggregation import AGGREGATIONS
from vitpeer.peer.core.config.options import DEMO_CONFIG

RULES = ("mean", "centered_clip", "trimmed_mean")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def swarm(out: Path, peers: int, rule: str, attack: str | None, steps: int, target: int) -> dict[str, Any]:
    """One run: ``peers`` peers (the last one lying with ``attack``, if any) to ``steps`` swarm steps of ``target``."""
    bootstrap = hivemind.DHT(start=True, host_maddrs=[LOOPBACK])
    meet = str(bootstrap.get_visible_maddrs()[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started, processes = time.monotonic(), []
    try:
        for index in range(peers):
            lying = attack is not None and index == peers - 1
            folder = out / f"peer-{index + 1}"
            folder.mkdir(parents=True)
            module = ["-m", "benchmarks.attacks", attack] if lying and attack else ["-m", "vitpeer.peer.cli"]
            command = [sys.executable, *module, "join", "--config", DEMO_CONFIG, "--initial-peers", meet]
            command += ["--max-steps", str(steps), "--target-batch-size", str(target), "--aggregation", rule]
            command += ["--host-maddr", LOOPBACK, "--output-dir", str(folder)]
            with (folder / "log.txt").open("w") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
        codes = [process.wait() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        bootstrap.shutdown()
    seconds = time.monotonic() - started
    honest = range(1, peers + (0 if attack else 1))
    failed = [index for index in honest if codes[index - 1] != 0]
    if failed:
        raise RuntimeError(f"honest peers {failed} of {rule}/{attack} failed; see {out}/peer-N/log.txt")
    results = [json.loads((out / f"peer-{index}" / "all_results.json").read_text()) for index in honest]
    costs = [result["swarm_costs"] for result in results]
    averaged = sum(cost["averaged_rounds"] for cost in costs)
    return {
        "honest_test_accuracy": statistics.mean(result["test_accuracy"] for result in results),
        "seconds": seconds,
        "round_seconds": sum(cost["averaging_seconds"] for cost in costs) / averaged if averaged else None,
        "averaged_rounds": averaged,
        "failed_rounds": sum(cost["failed_rounds"] for cost in costs),
    }


def run(
    peers: int = 4,
    steps: int = 30,
    target: int = 4096,
    rules: tuple[str, ...] = RULES,
    attacks: tuple[str, ...] = tuple(ATTACKS),
) -> dict[str, Any]:
    unknown = [rule for rule in rules if rule not in AGGREGATIONS]
    if unknown:
        raise ValueError(f"unknown rules {unknown}; expected some of {sorted(AGGREGATIONS)}")
    found: dict[str, Any] = {"config": DEMO_CONFIG, "peers": peers, "swarm_steps": steps, "target_batch_size": target}
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vitpeer-robust-") as tmp:
        for rule in rules:
            for attack in (None, *attacks):
                name = attack or "clean"
                runs.setdefault(rule, {})[name] = swarm(Path(tmp) / rule / name, peers, rule, attack, steps, target)
                print(f"robust: {rule:13s} {name:6s} {runs[rule][name]}", flush=True)
    found["runs"] = runs
    return found
