"""The live progress bar of ``vitpeer join`` and ``vitpeer train``: the numbers a user watches, on one line.

Lightning's tqdm bar counts batches of the current pass over the data; ``ProgressBar`` keeps it and replaces the
metrics beside it with: the loss, the learning rate and this process's samples/s, and in a swarm the swarm step out
of ``max_steps``, the samples the swarm has accumulated toward the target batch, and the number of peers. It is on
when the output is a terminal (``trainer.progress_bar``); logs and CI get the one line per swarm step instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities.data import extract_batch_size


def wanted(setting: bool | None) -> bool:
    """``trainer.progress_bar``: as set, or (None) when standard output is a terminal."""
    return sys.stdout.isatty() if setting is None else setting


class ProgressBar(TQDMProgressBar):
    """tqdm bar with loss, lr, samples/s and, in a swarm, ``swarm`` step/max, ``samples`` accumulated/target and
    ``peers``."""

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self._samples, self._started = 0, None

    # the bar's base declares (self, *_) where Callback, which Lightning calls it as, declares (trainer, pl_module)
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        super().on_train_start(trainer, pl_module)
        self._samples, self._started = 0, time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        self._samples += extract_batch_size(batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        shown = {key: value for key, value in super().get_metrics(trainer, pl_module).items() if key != "v_num"}
        from vitpeer.peer.core.lightning.strategy import (
            SwarmSteps,  # the strategy module imports hivemind: only when a bar is drawn
        )

        strategy = trainer.strategy
        if isinstance(strategy, SwarmSteps) and strategy.leader and strategy.optimizers:
            optimizer = strategy.optimizer
            progress = optimizer.tracker.global_progress
            shown["swarm"] = f"{optimizer.local_epoch}/{trainer.max_steps}"
            shown["samples"] = f"{progress.samples_accumulated}/{optimizer.target_batch_size}"
            shown["peers"] = max(1, progress.num_peers)
            lr = optimizer.opt.param_groups[0]["lr"]
        elif trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
        else:
            lr = None
        if lr is not None:
            shown["lr"] = f"{lr:.2e}"
        if self._started is not None and self._samples:
            shown["samples/s"] = f"{self._samples / max(1e-9, time.monotonic() - self._started):.0f}"
        return shown
