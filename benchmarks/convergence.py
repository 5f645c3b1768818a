"""Convergence: the same number of samples trained by 1 peer and by 2 peers; their test accuracies side by side.

Both are ``vitpeer demo`` swarms of ``config`` (the 1-peer one is a swarm of one: the same strategy, the same
target batch per swarm step), so the swarm steps, and the samples (``max_steps * target_batch_size``), are equal.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from vitpeer.peer.commands.demo import run_demo
from vitpeer.peer.core.config import load_config


def run(max_steps: int = 600, config: str = "digits_tiny") -> dict[str, Any]:
    target = load_config(config).swarm.target_batch_size
    results: dict[str, Any] = {"config": config, "swarm_steps": max_steps, "samples": max_steps * target}
    with tempfile.TemporaryDirectory(prefix="vitpeer-bench-") as tmp:
        for peers in (1, 2):
            started = time.perf_counter()
            accuracy = run_demo(peers, config, Path(tmp) / f"peers-{peers}", max_steps)
            if accuracy is None:
                raise RuntimeError(f"the {peers}-peer run failed; see its log above")
            results[f"peers_{peers}"] = {"test_accuracy": accuracy, "seconds": time.perf_counter() - started}
    results["gap_points"] = abs(results["peers_1"]["test_accuracy"] - results["peers_2"]["test_accuracy"]) * 100
    return results
