"""What ``vitpeer train`` and ``vitpeer join`` share around ``trainer.fit``: the same run files, the same numbers.

- ``trainer_args``: the ``pl.Trainer`` arguments both pass (length, numerics, logging into the output directory);
- ``run_callbacks``: what every run records (``checkpoints/``, ``history/``, the progress bar when shown), with
  ``checkpoints`` and ``best_checkpoint`` for the checkpoint files;
- ``RunStats``: this rank's training time, epoch times and samples, combined over all ranks into the results;
- ``write_results``: ``all_results.json``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities.data import extract_batch_size

from vitpeer.peer.core.config import RunConfig
from vitpeer.peer.core.lightning import progress
from vitpeer.peer.core.lightning.leave import AtomicCheckpointIO
from vitpeer.peer.core.runtime.history import History


def trainer_args(config: RunConfig) -> dict[str, Any]:
    """The ``pl.Trainer`` arguments ``train`` and ``join`` share: length, numerics, logging into the output dir."""
    return {
        "devices": config.parallel.devices,
        "precision": config.trainer.precision,
        "max_steps": config.trainer.max_steps,
        "max_epochs": -1,
        "accumulate_grad_batches": config.trainer.accumulate_grad_batches,
        "check_val_every_n_epoch": config.trainer.val_every_n_epochs,
        "log_every_n_steps": config.trainer.log_every_n_steps,
        "gradient_clip_val": config.trainer.grad_clip,
        "logger": loggers(config.trainer.output_dir),
        "enable_progress_bar": progress.wanted(config.trainer.progress_bar),
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "plugins": [AtomicCheckpointIO()],  # a stopped or killed run leaves whole checkpoints
    }


def loggers(out: Path) -> list[Logger]:
    """``metrics.csv`` in the run directory, and TensorBoard event files (``tensorboard/``) when it is installed."""
    found: list[Logger] = [CSVLogger(out, name="", version="")]
    if importlib.util.find_spec("tensorboard") is not None:
        found.append(TensorBoardLogger(out, name="tensorboard", version="", default_hp_metric=False))
    return found


def run_callbacks(config: RunConfig) -> list[pl.Callback]:
    """What every run records, ``train`` and ``join`` alike: checkpoints, history, the progress bar when shown."""
    out = config.trainer.output_dir
    callbacks: list[pl.Callback] = [*checkpoints(out, config.trainer.save_top_k), History(out)]
    if progress.wanted(config.trainer.progress_bar):
        callbacks.append(progress.ProgressBar())
    return callbacks


def checkpoints(out: Path, best: int = 0) -> list[ModelCheckpoint]:
    """``checkpoints/last.ckpt``, rewritten at every validation and at the end; and, when ``best`` > 0, the ``best``
    checkpoints by ``val/loss`` (``best-step=S-loss=L.ckpt``; a better one replaces the worst beyond ``best``).

    Two callbacks, because one that monitors ``val/loss`` writes ``last.ckpt`` only when it also saves a best one,
    so a run ending between validations would keep a stale ``last.ckpt``."""
    last = ModelCheckpoint(out / "checkpoints", save_last=True, save_top_k=0)
    if not best:
        return [last]
    ranked = ModelCheckpoint(
        out / "checkpoints",
        filename="best-step={step}-loss={val/loss:.4f}",
        auto_insert_metric_name=False,  # the metric's "/" would make a folder
        monitor="val/loss",
        mode="min",
        save_top_k=best,
    )
    return [last, ranked]


def best_checkpoint(trainer: pl.Trainer) -> str:
    """The path of the best checkpoint by ``val/loss`` so far, or "" when none was kept."""
    ranked = (cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor == "val/loss")
    return next((cb.best_model_path for cb in ranked), "")


class RunStats(pl.Callback):
    """This rank's training time, epoch times and samples; ``summary`` combines all ranks."""

    def __init__(self):
        self.samples, self.runtime, self.epochs = 0, 0.0, []  # epochs: (seconds, batches) per training epoch
        self.loss_sum, self.batches = 0.0, 0  # for train_loss, the mean over every local step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        self.started = time.monotonic()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_started, self.epoch_batches = time.monotonic(), 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        self.samples += extract_batch_size(batch)
        self.epoch_batches += 1
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            self.loss_sum += float(loss) * trainer.accumulate_grad_batches  # Lightning divided it by them
            self.batches += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append((time.monotonic() - self.epoch_started, self.epoch_batches))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.runtime = time.monotonic() - self.started

    def summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Every rank calls this (it reduces over all of them)."""
        strategy, device = trainer.strategy, trainer.strategy.root_device
        samples = int(strategy.reduce(torch.tensor(float(self.samples), device=device), reduce_op="sum"))
        runtime = float(strategy.reduce(torch.tensor(self.runtime, device=device), reduce_op="max"))
        mean_loss = self.loss_sum / self.batches if self.batches else float("nan")
        train_loss = float(strategy.reduce(torch.tensor(mean_loss, device=device), reduce_op="mean"))
        datamodule = trainer.datamodule  # pyright: ignore[reportAttributeAccessIssue]  # Lightning sets it undeclared
        train_set = getattr(datamodule, "train_set", None)
        full = trainer.num_training_batches
        complete = [seconds for seconds, batches in self.epochs if batches == full]  # max_steps may cut the last
        memory: dict[str, int | None] = {"peak_memory_allocated_bytes": None, "peak_memory_reserved_bytes": None}
        if device.type == "cuda":
            for key, value in (
                ("peak_memory_allocated_bytes", torch.cuda.max_memory_allocated(device)),
                ("peak_memory_reserved_bytes", torch.cuda.max_memory_reserved(device)),
            ):
                memory[key] = int(strategy.reduce(torch.tensor(float(value), device=device), reduce_op="max"))
        return {
            "train_loss": round(train_loss, 6),
            "epoch": round(samples / len(train_set), 3) if train_set else None,  # passes over the training split
            "train_samples": samples,
            "train_runtime": round(runtime, 3),
            "train_samples_per_second": round(samples / runtime, 2) if runtime else None,
            "epoch_time_seconds": round(sum(complete) / len(complete), 3) if complete else None,
            "epochs_completed": len(complete),
            **memory,
        }


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``all_results.json``: the run's numbers, in ``train`` and ``join`` alike (the keys the Hugging Face Trainer
    writes where they mean the same: train_loss, train_runtime, train_samples_per_second, eval_loss, eval_accuracy,
    epoch)."""
    (out / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
