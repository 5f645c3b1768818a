"""``python -m hostile join [options]``: the real ``vitpeer join`` with test faults switched on by environment.

- ``HOSTILE_NAN_EVERY=N``: every N-th training batch's images become NaN, so its loss and its gradients do, as a
  diverging or broken peer's would. The strategy's poison guard must keep those gradients out of the swarm. Added
  as a callback through ``run_join``'s public hook (``vitpeer.peer.commands.extend``).
- ``HOSTILE_SAY_ROUNDS=1``: print ``averaging round begins`` (flushed) when this peer hands its gradients to a
  round, so a test can SIGKILL it in the middle of averaging.
- ``HOSTILE_ROUNDS=ATTACK`` (``diloco``): every pseudo-gradient this peer sends to a round is rewritten as
  ``benchmarks.attacks.ATTACKS[ATTACK]`` says (``scale``, ``flip``, ``noise``, ``alie``), declared with a weight of a
  million samples.

Everything else is the production code path: ``vitpeer join``'s own parsing and ``run_join``.
"""

from __future__ import annotations

import os
import sys

import pytorch_lightning as pl

from benchmarks import attacks
from vitpeer.peer.commands.extend import join_with_callbacks
from vitpeer.peer.core.averaging import hivemind_optimizer
from vitpeer.peer.core.config import RunConfig

ROUND_MARK = "averaging round begins"


class NaNImagesEvery(pl.Callback):
    """Every ``every``-th training batch's images become NaN (in place, before ``training_step`` sees them)."""

    def __init__(self, every: int):
        self.every, self.batches = every, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        self.batches += 1
        if self.batches % self.every == 0:
            batch[0].fill_(float("nan"))


def say_rounds() -> None:
    average = hivemind_optimizer.SwarmOptimizer._average_gradients_and_load_into_optimizer

    def announced(self, maybe_step_control):
        if maybe_step_control is not None:
            print(ROUND_MARK, flush=True)
        return average(self, maybe_step_control)

    hivemind_optimizer.SwarmOptimizer._average_gradients_and_load_into_optimizer = announced


def faults(config: RunConfig) -> list[pl.Callback]:
    """The callbacks the environment asks for."""
    every = os.environ.get("HOSTILE_NAN_EVERY")
    return [NaNImagesEvery(int(every))] if every else []


if __name__ == "__main__":
    if sys.argv[1:2] != ["join"]:
        sys.exit("usage: python -m hostile join [vitpeer join options]")
    if os.environ.get("HOSTILE_SAY_ROUNDS"):
        say_rounds()
    if os.environ.get("HOSTILE_ROUNDS"):
        attacks.lie_in_rounds(attacks.ATTACKS[os.environ["HOSTILE_ROUNDS"]])
    join_with_callbacks(sys.argv[2:], faults)
