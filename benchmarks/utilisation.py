"""Swarm utilisation: 2 peers on loopback, share of each peer's wall time spent computing (forward and backward).

Each peer is the real ``vitpeer join`` (``python -m benchmarks.utilisation join ...``) with one callback added
through ``run_join``'s ``extra_callbacks`` (``vitpeer.peer.commands.extend``), ``ComputeClock``: compute is the time
from a local step's start to the end of its backward pass (Lightning calls ``on_before_optimizer_step`` right after
it, inside the closure hivemind runs); everything else in the peer's wall time (matchmaking, averaging, the optimizer
step, progress reports) is waiting on the swarm. The first ``WARMUP`` local steps (start-up, the first state
download) are left out.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

WARMUP = 20
CLOCK_FILE = "compute_clock.json"


class ComputeClock(pl.Callback):
    """Compute and wall seconds of one peer's local steps after ``WARMUP``; written to ``CLOCK_FILE`` at the end."""

    def __init__(self, out: Path):
        self.out = out
        self.compute = 0.0
        self.seen = self.steps = 0  # local steps since the start, and those timed
        self.started = self.step_started = self.ended = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step_started = time.perf_counter()
        if self.seen == WARMUP:  # counted across epochs: batch_idx starts again at each one
            self.started = self.step_started
        self.seen += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.seen > WARMUP:
            self.compute += time.perf_counter() - self.step_started
            self.steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ended = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        wall = self.ended - self.started
        numbers = {"compute_s": self.compute, "wall_s": wall, "local_steps": self.steps, "share": self.compute / wall}
        (self.out / CLOCK_FILE).write_text(json.dumps(numbers, indent=2) + "\n")


def run(max_steps: int = 60, config: str = "digits_tiny") -> dict[str, Any]:
    """Two timed peers train ``max_steps`` swarm steps of ``config`` together; each one's compute share."""
    from vitpeer.peer.commands.demo import run_demo

    with tempfile.TemporaryDirectory(prefix="vitpeer-bench-") as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        accuracy = run_demo(2, config, out, max_steps, module="benchmarks.utilisation")
        wall = time.perf_counter() - started
        if accuracy is None:
            raise RuntimeError("a benchmark peer failed; see its log above")
        peers = [json.loads((out / f"peer-{i}" / CLOCK_FILE).read_text()) for i in (1, 2)]
        results = [json.loads((out / f"peer-{i}" / "all_results.json").read_text()) for i in (1, 2)]
    return {
        "config": config,
        "swarm_steps": max_steps,
        "peers": peers,
        "share": min(peer["share"] for peer in peers),
        "seconds_per_swarm_step": wall / max_steps,
        "test_accuracy": accuracy,
        "swarm_samples_per_s": sum(r["samples_contributed"] for r in results)
        / max(r["train_runtime"] for r in results),
    }


if __name__ == "__main__":  # one timed peer, as run_demo starts it: the production command, ComputeClock added
    from vitpeer.peer.commands.extend import join_with_callbacks

    if sys.argv[1:2] != ["join"]:
        sys.exit("usage: python -m benchmarks.utilisation join [vitpeer join options]")
    join_with_callbacks(sys.argv[2:], lambda config: [ComputeClock(config.trainer.output_dir)])
