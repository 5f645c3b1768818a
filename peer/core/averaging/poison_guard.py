"""The poison guard of every swarm optimizer: a local batch whose gradients hold NaN or Inf never reaches the swarm.

One NaN in what a peer sends turns the whole round's average, and so every peer's parameters, into NaN. So each
algorithm asks ``PoisonGuard.refuses`` before a batch's gradients go anywhere (``gradient``: into the accumulator
hivemind sends; ``diloco``: into the inner step whose progress the next round sends), and counts every batch it
keeps out (``skipped``, and ``SwarmEvents.batch_skipped("nonfinite")`` for metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from vitpeer.peer.core.averaging.events import SwarmEvents

log = logging.getLogger(__name__)


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every value of ``tensors`` (None entries skipped) is finite; True when there are none."""
    present = [tensor for tensor in tensors if tensor is not None]
    return not present or bool(torch.isfinite(torch.nn.utils.get_total_norm(present)))


class PoisonGuard:
    """Keeps local batches with non-finite gradients out of the swarm, and counts them."""

    def __init__(self, events: SwarmEvents):
        self.events = events
        self.skipped = 0
        """Local batches kept out of the swarm so far."""

    def refuses(self, grads: Iterable[torch.Tensor | None], swarm_step: int) -> bool:
        """True, counted and logged, when this local batch's gradients hold NaN or Inf."""
        if all_finite(grads):
            return False
        self.skip(
            "non-finite gradients (NaN or Inf) in a local batch at swarm step %d: not sent to the swarm (%d such "
            "batches so far); check the learning rate, the data and the precision",
            swarm_step,
            self.skipped + 1,
        )
        return True

    def skip(self, message: str, *args: object) -> None:
        """Count a batch kept out of the swarm for another non-finite reason, with its log line."""
        self.skipped += 1
        log.warning(message, *args)
        self.events.batch_skipped("nonfinite")
