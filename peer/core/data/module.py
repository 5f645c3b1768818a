"""The Lightning data module: train/val/test loaders transformed for the model, in this peer's own order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from timm.data.transforms_factory import create_transform  # timm.data does not re-export it to type checkers
from torch.utils.data import DataLoader, DistributedSampler

from vitpeer.peer.core.config import DataConfig
from vitpeer.peer.core.data.sources import load_splits, num_classes
from vitpeer.peer.core.data.splits import ArraySource, ImageSplit, Part

TRAIN_SCALE = (0.5, 1.0)
"""Share of the image area kept by the training random-resized crop (light augmentation)."""

DIGITS_TRAIN_SCALE = (0.8, 1.0)
"""Gentler crops for the 8x8 digits, where a few pixels can hold a whole stroke."""


def build_transforms(image_config: dict[str, Any], source: str, augment: bool = True) -> tuple[Callable, Callable]:
    """timm's (train, eval) transforms for the model's ``image_config``; no horizontal flip for digits.

    Without ``augment`` training uses the deterministic evaluation transform."""
    channels, height, width = image_config["input_size"]
    if channels != 3:
        raise ValueError(f"input_size {image_config['input_size']} has {channels} channels; images here are RGB (3)")
    common = {
        "input_size": (channels, height, width),
        "interpolation": image_config.get("interpolation", "bilinear"),
        "mean": tuple(image_config["mean"]),
        "std": tuple(image_config["std"]),
    }
    digits = source == "digits"
    train = create_transform(
        **common,
        is_training=True,
        scale=DIGITS_TRAIN_SCALE if digits else TRAIN_SCALE,
        hflip=0.0 if digits else 0.5,
        color_jitter=0.0,
    )
    evaluate = create_transform(
        **common,
        is_training=False,
        crop_pct=image_config.get("crop_pct"),
        crop_mode=image_config.get("crop_mode"),
    )
    # timm's create_transform returns a tuple of transforms only with separate=True, which neither call passes
    return (train if augment else evaluate), evaluate  # pyright: ignore[reportReturnType]


KEEP_BYTES = 256 * 2**20
"""Largest split whose transformed images ``VisionDataModule`` keeps in memory (digits at 16 px: 4 MiB)."""


class VisionDataModule(pl.LightningDataModule):
    """Train/val/test loaders of ``config.source``, transformed for the model, in this peer's own training order."""

    def __init__(self, config: DataConfig, image_config: dict[str, Any], order_seed: int) -> None:
        super().__init__()
        self.config = config
        self.image_config = image_config
        self.order_seed = order_seed
        self.train_transform, self.eval_transform = build_transforms(image_config, config.source, config.augment)
        self.class_names: list[str] = []
        self.train_set: ImageSplit | None = None
        self.val_set: ImageSplit | None = None
        self.test_set: ImageSplit | None = None

    @property
    def num_classes(self) -> int:
        """Classes of the data set (known after ``setup``; before it, found from the config)."""
        return len(self.class_names) if self.class_names else num_classes(self.config)

    def setup(self, stage: str | None = None) -> None:
        """Load the source and split it (once; later calls keep the first result)."""
        if self.train_set is not None:
            return
        loaded = load_splits(self.config)
        self.class_names = loaded.class_names
        self.train_set = ImageSplit(*loaded.train, self.train_transform, self._keeps(loaded.train, self.config.augment))
        self.val_set = ImageSplit(*loaded.val, self.eval_transform, self._keeps(loaded.val, False))
        self.test_set = ImageSplit(*loaded.test, self.eval_transform, self._keeps(loaded.test, False))
        if len(self.train_set) < self.config.batch_size:
            raise ValueError(
                f"the training split has {len(self.train_set)} samples, fewer than data.batch_size="
                f"{self.config.batch_size}; lower the batch size or use more data"
            )

    def _keeps(self, part: Part, augmented: bool) -> bool:
        """Keep transformed images of an in-memory split with a fixed transform when they fit in ``KEEP_BYTES``."""
        channels, height, width = self.image_config["input_size"]
        size = len(part.indices) * channels * height * width * 4  # float32 tensors
        return not augmented and isinstance(part.source, ArraySource) and size <= KEEP_BYTES

    def train_dataloader(self) -> DataLoader:
        """Shuffled in this peer's order (seeded with ``order_seed``); incomplete last batches are dropped.

        With several ranks each takes its own part of that order (a ``DistributedSampler`` with this seed, which
        Lightning keeps; its own would use the run seed, the same on every peer)."""
        split = self._split("train")
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(
                split, trainer.world_size, trainer.global_rank, shuffle=True, seed=self.order_seed, drop_last=True
            )
            return self._loader(split, self.config.batch_size, shuffle=False, sampler=sampler)
        generator = torch.Generator().manual_seed(self.order_seed)
        return self._loader(split, self.config.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split("val"), self._eval_batch_size(), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"), self._eval_batch_size(), shuffle=False)

    def _eval_batch_size(self) -> int:
        return self.config.eval_batch_size or self.config.batch_size

    def _split(self, role: str) -> ImageSplit:
        self.setup()
        split = getattr(self, f"{role}_set")
        assert split is not None
        return split

    def _loader(
        self,
        split: ImageSplit,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        sampler: DistributedSampler | None = None,
    ) -> DataLoader:
        """Training loaders (shuffled, or sampled per rank) drop an incomplete last batch; evaluation keeps it."""
        workers = self.config.num_workers
        return DataLoader(
            split,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=shuffle or sampler is not None,
            generator=generator,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
