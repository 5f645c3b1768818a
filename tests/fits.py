"""One peer's Lightning fit in the test process: a vitpeer strategy (a started DHT behind it), the embedded digits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl

from vitpeer.peer.core.data import VisionDataModule, num_classes
from vitpeer.peer.core.lightning.strategy import SwarmSteps
from vitpeer.peer.core.model import ImageClassifier, build_model, image_config


def fit(
    config,
    strategy: SwarmSteps,
    max_steps: int,
    ckpt_dir: Path,
    resume: Path | None = None,
    *,
    accelerator: str = "cpu",
    callbacks: Sequence[pl.Callback] = (),
) -> pl.Trainer:
    """Train ``max_steps`` swarm steps (resuming from ``resume`` as ``vitpeer join --resume`` does), checkpointing
    ``last.ckpt`` into ``ckpt_dir``; ``callbacks`` beside the checkpoint's."""
    pl.seed_everything(0, verbose=False)
    net = build_model(config.model, num_classes(config.data))
    module = ImageClassifier(net, 10, config.optim, config.trainer.max_steps)
    data = VisionDataModule(config.data, image_config(net, config.model), order_seed=1)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator=accelerator,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=any(isinstance(callback, pl.callbacks.ProgressBar) for callback in callbacks),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[pl.callbacks.ModelCheckpoint(ckpt_dir, save_last=True, save_top_k=0), *callbacks],
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)  # as join does: never unpickle code
    return trainer
