"""Swarm utilisation: 2 peers on loopback, share of each peer's wall time spent computing.

Each peer is the real ``vitpeer join`` (``python -m benchmarks.utilisation join ...``) with one callback added
through ``run_join``'s ``extra_callbacks`` (``vitpeer.peer.commands.extend``), ``ComputeClock``. Compute is what a
lone trainer does too: the time from a local step's start to the end of its backward pass (Lightning calls
``on_before_optimizer_step`` right after it, inside the closure the swarm optimizer runs), plus the inner optimizer's
own steps (timed by step hooks on the module's torch optimizer: every local step in ``diloco``, once per swarm step
in ``gradient``). Everything else in the peer's wall time (matchmaking, waiting for rounds, syncs, progress reports,
rebasing, Lightning's loop) counts as not computing. The first ``WARMUP`` local steps (start-up, the first state
download) are left out.

Two shares come out of it, for each peer:
- ``share``: compute / wall, as above. A lone peer of a tiny model does not reach 1 either (Lightning's loop, data
  loading): compare with a lone peer's share, which ``benchmarks.scaling`` measures beside it.
- ``free_share``: 1 - swarm / wall, where *swarm* is the time the swarm holds the training thread: from the end of the
  backward pass to the end of the local step, less the inner optimizer's step. It is waiting for rounds, syncs and
  downloads plus the swarm's own work in the thread (progress reports, hand-offs, rebasing): the share of its time a
  peer does not spend on the swarm, the figure the utilisation goal is about.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

WARMUP = 20
CLOCK_FILE = "compute_clock.json"


class ComputeClock(pl.Callback):
    """Compute and wall seconds of one peer's local steps after ``WARMUP``; written to ``CLOCK_FILE`` at the end."""

    def __init__(self, out: Path):
        self.out = out
        self.compute = self.swarm = self.inner = 0.0  # timed seconds; inner: of the step in progress
        self.backward_ended = 0.0
        self.seen = self.steps = 0  # local steps since the start, and those timed
        self.epoch_start = self.epoch_end = 0  # the swarm step when the timed window starts, and when it ends
        self.started = self.step_started = self.ended = self.inner_started = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        inner = _inner_optimizer(trainer.strategy.optimizers[0])
        inner.register_step_pre_hook(self._inner_step_starts)
        inner.register_step_post_hook(self._inner_step_ends)

    def _inner_step_starts(self, *_) -> None:
        self.inner_started = time.perf_counter()

    def _inner_step_ends(self, *_) -> None:
        if self.seen > WARMUP:
            self.inner += time.perf_counter() - self.inner_started

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step_started = time.perf_counter()
        if self.seen == WARMUP:  # counted across epochs: batch_idx starts again at each one
            self.started = self.step_started
            self.epoch_start = trainer.strategy.swarm_epoch
        self.seen += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.backward_ended = time.perf_counter()
        if self.seen > WARMUP:
            self.compute += self.backward_ended - self.step_started
            self.steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ended = time.perf_counter()
        if self.seen > WARMUP:  # the inner step (gradient: at a swarm step) computes; the rest is the swarm's
            self.compute += self.inner
            self.swarm += max(0.0, self.ended - self.backward_ended - self.inner)
        self.inner = 0.0
        self.epoch_end = trainer.strategy.swarm_epoch

    def on_train_end(self, trainer, pl_module) -> None:
        wall = self.ended - self.started
        numbers = {"compute_s": self.compute, "swarm_s": self.swarm, "wall_s": wall, "local_steps": self.steps}
        numbers["share"], numbers["free_share"] = self.compute / wall, 1 - self.swarm / wall
        numbers["epoch_start"], numbers["epoch_end"] = self.epoch_start, self.epoch_end
        swarm_steps = self.epoch_end - self.epoch_start
        numbers["seconds_per_swarm_step"] = wall / swarm_steps if swarm_steps > 0 else None
        (self.out / CLOCK_FILE).write_text(json.dumps(numbers, indent=2) + "\n")


def _inner_optimizer(swarm_optimizer):
    """The torch optimizer that steps the parameters: ``DiLoCoOptimizer.opt``, or hivemind's own."""
    inner = getattr(swarm_optimizer, "opt", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    return swarm_optimizer.state_averager.optimizer


def run(max_steps: int = 60, config: str = "digits_tiny_gradient") -> dict[str, Any]:
    """Two timed peers train ``max_steps`` swarm steps of ``config`` together; each one's compute share."""
    from vitpeer.peer.commands.demo import run_demo
    from vitpeer.peer.core.config import load_config

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
        "algorithm": load_config(config).swarm.algorithm,
        "swarm_steps": max_steps,
        "peers": peers,
        "share": min(peer["share"] for peer in peers),
        "free_share": min(peer["free_share"] for peer in peers),
        # each peer's timed window (start-up and the first WARMUP local steps left out) over the swarm steps in it
        "seconds_per_swarm_step": sum(peer["seconds_per_swarm_step"] for peer in peers) / len(peers),
        "demo_wall_s": wall,  # the whole run_demo: start-up, the test and shutdown included
        "test_accuracy": accuracy,
        "swarm_samples_per_s": sum(r["samples_contributed"] for r in results)
        / max(r["train_runtime"] for r in results),
    }


if __name__ == "__main__":  # one timed peer, as run_demo starts it: the production command, ComputeClock added
    from vitpeer.peer.commands.extend import join_with_callbacks

    if sys.argv[1:2] != ["join"]:
        sys.exit("usage: python -m benchmarks.utilisation join [vitpeer join options]")
    join_with_callbacks(sys.argv[2:], lambda config: [ComputeClock(config.trainer.output_dir)])
