"""Strategy overhead: one peer under ``HivemindStrategy`` against plain Lightning, same model, data and batch.

Both run in this process, one after the other, on the same device with the same threads. The hivemind peer is alone
in its swarm (its own DHT on loopback): every ``target_batch_size`` samples it takes its swarm step with no one to
average with, so what is measured is the wrapper itself: the hand-over of gradients to hivemind, its host-side
(offloaded) optimizer step, progress reports to the DHT, the pre-scheduled matchmaking it cancels, our callbacks.
Every case's target is small enough that the timed window holds several swarm steps (``swarm_steps`` in the results),
so the optimizer step is in the figure. hivemind 1.1.12 starts no all-reduce while it counts one peer (its
optimizer's gradient-averaging step checks the peer count first): waiting for and averaging with other peers is
measured by ``benchmarks.utilisation``.
"""

from __future__ import annotations

import time
from typing import Any

import hivemind
import pytorch_lightning as pl

from vitpeer.peer.core.config import RunConfig, load_config
from vitpeer.peer.core.data import VisionDataModule, num_classes
from vitpeer.peer.core.lightning.strategy import HivemindStrategy
from vitpeer.peer.core.model import ImageClassifier, build_model, image_config


class StepClock(pl.Callback):
    """Samples per second over local steps ``warmup`` .. ``warmup + steps`` (counted across epochs), and the swarm
    steps taken in them (0 without a swarm); stops the run after them."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.seen = self.samples = 0
        self.started = self.ended = 0.0
        self.epoch_start = self.epoch_end = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.warmup:
            self.started = time.perf_counter()
            self.epoch_start = swarm_epoch(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen > self.warmup:
            self.samples += len(batch[0])
            self.ended = time.perf_counter()
            self.epoch_end = swarm_epoch(trainer)
        if self.seen >= self.warmup + self.steps:
            trainer.should_stop = True

    @property
    def swarm_steps(self) -> int:
        return self.epoch_end - self.epoch_start

    @property
    def samples_per_second(self) -> float:
        return self.samples / (self.ended - self.started)


def swarm_epoch(trainer: pl.Trainer) -> int:
    """The swarm step a hivemind peer is at; 0 under plain Lightning."""
    return getattr(trainer.strategy, "swarm_epoch", 0)


def samples_per_second(config: RunConfig, hivemind_peer: bool, warmup: int, steps: int) -> tuple[float, int]:
    """Samples per second over the timed local steps, and the swarm steps taken in them."""
    pl.seed_everything(0, verbose=False)
    classes = num_classes(config.data)
    net = build_model(config.model, classes)
    data = VisionDataModule(config.data, image_config(net, config.model), order_seed=0)
    module = ImageClassifier(net, classes, config.optim, 10**6)
    clock = StepClock(warmup, steps)
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) if hivemind_peer else None
    strategy = HivemindStrategy(config.swarm, dht, device="cpu") if hivemind_peer else "auto"
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        max_steps=10**6,
        max_epochs=-1,
        gradient_clip_val=config.trainer.grad_clip,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    try:
        trainer.fit(module, datamodule=data)
    finally:
        if dht is not None:
            dht.shutdown()
    return clock.samples_per_second, clock.swarm_steps


CASES = {
    # name: (config, overrides, warm-up local steps, timed local steps)
    "digits_tiny_gradient": ("digits_tiny_gradient", {}, 10, 120),  # target 256 = 8 local steps: 15 swarm steps timed
    "vit_small_224": (  # a local step takes seconds on a CPU: target 32 = 4 local steps, 3 swarm steps timed
        "digits_tiny_gradient",
        {
            "model.name": "vit_small_patch16_224",
            "model.img_size": 224,
            "model.kwargs": {},
            "data.batch_size": 8,
            "swarm.target_batch_size": 32,
        },
        2,
        12,
    ),
}


def run(cases: list[str] | None = None) -> dict[str, Any]:
    results = {}
    for name in cases or list(CASES):
        config_name, overrides, warmup, steps = CASES[name]
        config = load_config(config_name, overrides)
        config.swarm.run_id = f"overhead-{name}-{time.time_ns()}"  # alone: no earlier benchmark's records
        plain, _ = samples_per_second(config, hivemind_peer=False, warmup=warmup, steps=steps)
        peer, swarm_steps = samples_per_second(config, hivemind_peer=True, warmup=warmup, steps=steps)
        results[name] = {
            "model": config.model.name,
            "img_size": config.model.img_size,
            "batch_size": config.data.batch_size,
            "algorithm": config.swarm.algorithm,
            "target_batch_size": config.swarm.target_batch_size,
            "timed_steps": steps,
            "swarm_steps": swarm_steps,  # the hivemind peer's, inside the timed local steps
            "lightning_samples_per_s": plain,
            "hivemind_samples_per_s": peer,
            "ratio": peer / plain,
        }
    return results
