"""``python -m hostile [vitpeer arguments]``: the real ``vitpeer`` command with test faults switched on by environment.

- ``HOSTILE_NAN_EVERY=N``: every N-th training batch's loss becomes NaN (so its gradients do), as a diverging or
  broken peer's would. The strategy's poison guard must keep those gradients out of the swarm.
- ``HOSTILE_SAY_ROUNDS=1``: print ``averaging round begins`` (flushed) when this peer hands its gradients to a
  round, so a test can SIGKILL it in the middle of averaging.

Everything else is the production code path: ``vitpeer.peer.cli.main``.
"""

from __future__ import annotations

import os
import sys

import torch

from vitpeer.peer.cli import main
from vitpeer.peer.core import model as module
from vitpeer.peer.core import strategy

ROUND_MARK = "averaging round begins"


def poison_every(every: int) -> None:
    training_step = module.ImageClassifier.training_step
    seen = {"batches": 0}

    def poisoned(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        seen["batches"] += 1
        return loss * torch.tensor(float("nan")) if seen["batches"] % every == 0 else loss

    module.ImageClassifier.training_step = poisoned


def say_rounds() -> None:
    average = strategy.SwarmOptimizer._average_gradients_and_load_into_optimizer

    def announced(self, maybe_step_control):
        if maybe_step_control is not None:
            print(ROUND_MARK, flush=True)
        return average(self, maybe_step_control)

    strategy.SwarmOptimizer._average_gradients_and_load_into_optimizer = announced


if __name__ == "__main__":
    if os.environ.get("HOSTILE_NAN_EVERY"):
        poison_every(int(os.environ["HOSTILE_NAN_EVERY"]))
    if os.environ.get("HOSTILE_SAY_ROUNDS"):
        say_rounds()
    sys.exit(main(sys.argv[1:]))
