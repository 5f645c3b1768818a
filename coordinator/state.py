"""What the coordinator does with the run's state: open it in the run's algorithm (``open_swarm_state``) and
evaluate it (``evaluate``). The state itself, one class per algorithm, is ``core.algorithms.observers``."""

from __future__ import annotations

import logging
import math
import time

import hivemind
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vitpeer.peer.core.algorithms.observers import SwarmState
from vitpeer.peer.core.averaging.remote_state import can_read_progress
from vitpeer.peer.core.config import RunConfig, algorithm_named

log = logging.getLogger(__name__)


def open_swarm_state(config: RunConfig, dht: hivemind.DHT) -> SwarmState:
    """The ``SwarmState`` that speaks ``config.swarm.algorithm``'s protocol, started on ``dht``."""
    can_read_progress(dht, config.swarm.run_id)  # the bound on a downloaded state's step reads the peers' progress
    return algorithm_named(config.swarm.algorithm).observe(config, dht)


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader, max_batches: int | None = None) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of ``net`` on ``loader`` (its first ``max_batches`` batches)."""
    started = time.monotonic()
    was_training = net.training
    net.eval()
    total_loss, correct, seen = 0.0, 0, 0
    try:
        for index, (images, labels) in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            logits = net(images)
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
    finally:
        net.train(was_training)
    if seen == 0:
        raise ValueError("the validation split is empty: nothing to evaluate")
    return {
        "val_loss": total_loss / seen if math.isfinite(total_loss) else float("nan"),
        "val_accuracy": correct / seen,
        "val_samples": seen,
        "eval_seconds": round(time.monotonic() - started, 3),
    }
