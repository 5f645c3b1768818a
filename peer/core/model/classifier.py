"""The LightningModule: image classification around any timm model, AdamW with warm-up + cosine.

The network is built by ``build_model`` (timm by name) and injected, so the module holds only training logic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from timm.data.config import resolve_data_config  # timm.data does not re-export it to type checkers
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torchmetrics.classification import MulticlassAccuracy

from vitpeer.peer.core.config import ModelConfig, OptimConfig


def build_model(config: ModelConfig, num_classes: int) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head; hub weights only when ``config.pretrained`` asks for them."""
    kwargs = dict(config.kwargs)
    if config.img_size is not None:
        kwargs["img_size"] = config.img_size
    if config.weights is not None:
        if not config.weights.is_file():
            raise FileNotFoundError(f"model.weights = {str(config.weights)!r}: no such file")
        # timm's own loader: reads .safetensors/.pth, adapts the patch embedding and drops a mismatched head
        kwargs["pretrained_cfg_overlay"] = {"file": str(config.weights)}
    try:
        return timm.create_model(
            config.name, pretrained=config.pretrained or config.weights is not None, num_classes=num_classes, **kwargs
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"model.name = {config.name!r} is not a timm model; see timm.list_models('vit_*')"
            ) from err
        raise


def image_config(net: nn.Module, config: ModelConfig) -> dict:
    """timm's preprocessing for ``net`` (size, mean, std, crop), at ``config.img_size`` when that is set."""
    resolved = resolve_data_config(model=net)
    if config.img_size is not None:
        resolved["input_size"] = (resolved["input_size"][0], config.img_size, config.img_size)
    return resolved


def _cosine(start: float, end: float, progress: float) -> float:
    """From ``start`` (progress 0) to ``end`` (progress 1) along half a cosine."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


@dataclass(frozen=True)
class Schedule:
    """Learning-rate factor for optimizer step ``step`` (see ``OptimConfig.schedule``).

    A pure function of the step, so every peer that knows the swarm step computes the same rate, whenever it joined;
    that is why OneCycle is written here rather than taken from ``torch.optim.lr_scheduler.OneCycleLR``, whose rate
    depends on how many times it was stepped.
    """

    kind: str
    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0

    # torch's OneCycleLR defaults: start at lr / div_factor (25), rise over 30 %, end at start / final_div_factor (1e4)
    ONECYCLE_START, ONECYCLE_RISE = 1 / 25, 0.3
    ONECYCLE_END = ONECYCLE_START / 1e4

    def __call__(self, step: int) -> float:
        if self.kind == "onecycle":
            rise = self.warmup_steps or max(1, round(self.ONECYCLE_RISE * self.total_steps))
            if step < rise:
                return _cosine(self.ONECYCLE_START, 1.0, step / rise)
            return _cosine(1.0, self.ONECYCLE_END, (step - rise) / max(1, self.total_steps - rise))
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        return _cosine(1.0, self.min_ratio, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classification with accuracy metrics; logs ``train/*``, ``val/*``, ``test/*``."""

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optim: OptimConfig,
        max_steps: int,
        shard: Callable[[nn.Module, DeviceMesh], Any] | None = None,
    ):
        super().__init__()
        self.net = net
        self.optim = optim
        self.max_steps = max_steps
        self.shard = (
            shard  # FSDP: how to shard ``net`` over the data-parallel ranks (``core.model.parallel.shard_model``)
        )
        # micro: correct / seen, the top-1 accuracy people quote (torchmetrics' default, macro, averages per class)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def configure_model(self) -> None:
        """Under FSDP, shard the network over the ranks once the process group exists; otherwise nothing to do."""
        if self.shard is not None:
            mesh = self.device_mesh  # set by ModelParallelStrategy: fsdp, the one setting that passes a shard
            if mesh is None:
                raise RuntimeError("ImageClassifier(shard=...) needs ModelParallelStrategy (parallel.strategy='fsdp')")
            self.shard(self.net, mesh["data_parallel"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.optim.label_smoothing)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str, metric: MulticlassAccuracy) -> None:
        images, labels = batch
        logits = self(images)
        metric(logits, labels)
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)  # mean of all ranks
        self.log(f"{split}/acc", metric, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """AdamW without weight decay on biases and norms; LambdaLR so the rate is a function of the step alone."""
        decay, no_decay = [], []
        for param in self.net.parameters():
            if param.requires_grad:
                (decay if param.ndim > 1 else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr,
        )
        schedule = Schedule(self.optim.schedule, self.optim.warmup_steps, self.max_steps, self.optim.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
