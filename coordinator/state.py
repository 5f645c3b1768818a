"""The run's model and optimizer as the coordinator holds them: downloaded from peers, evaluated, served to joiners.

The coordinator keeps the collaborative state in a hivemind ``TrainingStateAverager`` under the same prefix as the
peers' ``hivemind.Optimizer`` (``<run_id>_state_averager``), with the same tensors in the same order. It never joins
an averaging round (it never calls ``step``); it only

- downloads the state from the most advanced peer (``download``), and
- offers its own copy to peers that join (``share``), with a priority just below a live peer at the same step, so a
  joiner asks live peers first and the coordinator when everyone has left.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import hivemind
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hivemind.optim.state_averager import TrainingStateAverager
from torch import nn
from torch.utils.data import DataLoader

from vitpeer.peer.core.config import RunConfig
from vitpeer.peer.core.data import num_classes
from vitpeer.peer.core.hivemind_adapters import catch_up_scheduler
from vitpeer.peer.core.model import ImageClassifier, build_model
from vitpeer.peer.core.strategy import COMPRESSION, factory_form

log = logging.getLogger(__name__)


class SwarmState:
    """The model, optimizer and swarm step (hivemind epoch) of the run, as the coordinator last saw them."""

    def __init__(self, config: RunConfig, dht: hivemind.DHT):
        pl.seed_everything(config.trainer.seed, verbose=False)
        model = config.model.model_copy(update={"pretrained": False, "weights": None})  # weights come from peers
        self.num_classes = num_classes(config.data)
        self.net = build_model(model, self.num_classes)
        built = ImageClassifier(
            self.net, self.num_classes, config.optim, config.trainer.max_steps
        ).configure_optimizers()
        params, optimizer, scheduler = factory_form(built["optimizer"], built["lr_scheduler"]["scheduler"])
        self.averager = TrainingStateAverager(
            dht=dht,
            prefix=f"{config.swarm.run_id}_state_averager",  # hivemind.Optimizer's prefix for the same state
            params=params,
            optimizer=optimizer,
            scheduler=scheduler,
            state_compression=COMPRESSION[config.swarm.wire_compression](),
            allow_state_sharing=False,  # nothing worth serving until a download or a checkpoint
            start=True,
        )

    @property
    def epoch(self) -> int:
        return self.averager.local_epoch

    def download(self, timeout: float) -> bool:
        """Fetch the newest state from the peers within ``timeout`` s; True if it moved us to a newer step."""
        before = self.epoch
        try:
            with _scheduler_catch_up():
                self.averager.load_state_from_peers(timeout=timeout)
        except FutureTimeout as err:
            raise TimeoutError(f"no peer sent its state within {timeout:.0f} s") from err
        if self.epoch <= before:
            return False
        self.share()
        return True

    def share(self) -> None:
        """Offer this state to joining peers (below a live peer at the same step, above any peer behind it)."""
        self.averager.state_sharing_priority = self.epoch - 0.5
        self.averager.allow_state_sharing = True

    def state_dict(self) -> dict[str, Any]:
        with self.averager.lock_averaged_tensors:
            return {
                "model": self.net.state_dict(),
                "optimizer": self.averager.optimizer.state_dict(),
                "swarm_epoch": self.epoch,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint (after a coordinator restart) and serve it."""
        with torch.no_grad(), self.averager.lock_averaged_tensors:
            self.net.load_state_dict(state["model"])
            self.averager.optimizer.load_state_dict(state["optimizer"])
        self.averager.local_epoch = int(state["swarm_epoch"])
        with _scheduler_catch_up():
            catch_up_scheduler(self.averager)  # hivemind's own catch-up: scheduler steps == local epoch
        self.share()

    def shutdown(self) -> None:
        self.averager.shutdown()


@contextlib.contextmanager
def _scheduler_catch_up():
    """Stepping the LR scheduler to the loaded step without optimizer steps is intended here: silence torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        yield


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
