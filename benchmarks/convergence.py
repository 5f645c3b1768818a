"""Quality at equal samples: 1 peer and 2 peers train the same config, over several seeds; mean and spread of their
test accuracies.

Both are ``vitpeer demo`` swarms, each peer pinned to a core of its own (the 1-peer one is a swarm of one: the same
strategy and rounds). A 2-peer swarm step gathers a little more than ``target_batch_size`` samples (a peer learns the
target is met only at its next progress check, and trains on meanwhile), so the 2-peer run goes first and the lone
peer then trains as many swarm steps as it takes to match the samples the pair actually trained: equal samples, not
equal steps. Both numbers are in the results.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from vitpeer.peer.commands.demo import run_demo
from vitpeer.peer.core.config import load_config
from vitpeer.peer.core.config.options import DEMO_CONFIG


def _trained(out: Path, peers: int) -> int:
    return sum(
        json.loads((out / f"peer-{i}" / "all_results.json").read_text())["samples_contributed"]
        for i in range(1, peers + 1)
    )


def one_seed(config: str, max_steps: int, seed: int, tmp: Path) -> dict[str, Any]:
    target = load_config(config).swarm.target_batch_size
    seed_args = ["--seed", str(seed)]
    pair_dir, alone_dir = tmp / f"seed-{seed}-peers-2", tmp / f"seed-{seed}-peers-1"
    pair = run_demo(2, config, pair_dir, max_steps, pin_cores=True, extra_args=seed_args)
    if pair is None:
        raise RuntimeError(f"the 2-peer run of seed {seed} failed; see its log above")
    pair_samples = _trained(pair_dir, 2)
    alone_steps = math.ceil(pair_samples / target)
    alone = run_demo(1, config, alone_dir, alone_steps, pin_cores=True, extra_args=seed_args)
    if alone is None:
        raise RuntimeError(f"the 1-peer run of seed {seed} failed; see its log above")
    return {
        "seed": seed,
        "peers_2": {"test_accuracy": pair, "swarm_steps": max_steps, "samples": pair_samples},
        "peers_1": {"test_accuracy": alone, "swarm_steps": alone_steps, "samples": _trained(alone_dir, 1)},
    }


def run(seeds: int = 3, config: str = DEMO_CONFIG, max_steps: int | None = None) -> dict[str, Any]:
    steps = max_steps or load_config(config).trainer.max_steps
    with tempfile.TemporaryDirectory(prefix="vitpeer-bench-") as tmp:
        runs = [one_seed(config, steps, seed, Path(tmp)) for seed in range(seeds)]
    summary: dict[str, Any] = {"config": config, "swarm_steps": steps, "runs": runs}
    for peers in ("peers_1", "peers_2"):
        accuracies = [r[peers]["test_accuracy"] for r in runs]
        summary[peers] = {"mean": statistics.mean(accuracies), "spread": max(accuracies) - min(accuracies)}
    summary["gap_points"] = (summary["peers_1"]["mean"] - summary["peers_2"]["mean"]) * 100
    return summary


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
