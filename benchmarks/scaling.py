"""Scaling: how much faster the swarm trains when a volunteer joins. 1 peer on one core against 2 peers, each on
a core of its own (``taskset``, one thread each), the same config and the same swarm steps, so the same samples.

The figure is the swarm's samples per second (the samples the peers contributed over the longest peer's training
time, start-up and state download included), 2 peers over 1; with it, each run's compute share (``utilisation``'s
``ComputeClock``) and test accuracy, so speed and quality at equal samples are read together.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.utilisation import CLOCK_FILE


def one(peers: int, config: str, max_steps: int) -> dict[str, Any]:
    from vitpeer.peer.commands.demo import run_demo

    with tempfile.TemporaryDirectory(prefix="vitpeer-scaling-") as tmp:
        out = Path(tmp)
        accuracy = run_demo(peers, config, out, max_steps, module="benchmarks.utilisation", pin_cores=True)
        if accuracy is None:
            raise RuntimeError("a benchmark peer failed; see its log above")
        clocks = [json.loads((out / f"peer-{i}" / CLOCK_FILE).read_text()) for i in range(1, peers + 1)]
        results = [json.loads((out / f"peer-{i}" / "all_results.json").read_text()) for i in range(1, peers + 1)]
    samples = sum(r["samples_contributed"] for r in results)
    seconds = max(r["train_runtime"] for r in results)
    return {
        "peers": peers,
        "samples": samples,
        "seconds": seconds,
        "swarm_samples_per_s": samples / seconds,
        "share": min(clock["share"] for clock in clocks),
        "free_share": min(clock["free_share"] for clock in clocks),
        "test_accuracy": accuracy,
    }


def run(config: str = "digits_tiny_diloco", max_steps: int | None = None) -> dict[str, Any]:
    alone, pair = one(1, config, max_steps), one(2, config, max_steps)
    return {
        "config": config,
        "swarm_steps": max_steps,
        "one_peer": alone,
        "two_peers": pair,
        "speedup": pair["swarm_samples_per_s"] / alone["swarm_samples_per_s"],
    }


if __name__ == "__main__":
    import sys

    config = sys.argv[1] if len(sys.argv) > 1 else "digits_tiny_diloco"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else None
    print(json.dumps(run(config, steps), indent=2))
