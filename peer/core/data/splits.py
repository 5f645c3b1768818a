"""Samples and splits: where a source's images come from (``ImageSource``), the fixed stratified split every peer
shares (``split_indices``), and a transformed split (``ImageSplit``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

Ints = Sequence[int] | np.ndarray
"""Labels or indices: a list of ints or a 1-D integer array (what numpy and the data sets hand over)."""


class ImageSource(Protocol):
    """Indexable labelled images: ``labels[i]`` is the class of ``image(i)``."""

    labels: np.ndarray

    def image(self, index: int) -> Image.Image: ...


class ArraySource:
    """Images held in memory as uint8, N x H x W (grayscale) or N x H x W x 3."""

    def __init__(self, images: np.ndarray, labels: Ints) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")


class FileSource:
    """Image files on disk, read with PIL."""

    def __init__(self, paths: Sequence[str], labels: Ints) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as img:
            return img.convert("RGB")


class ImageSplit(Dataset):
    """The samples ``indices`` of a source, transformed: items are ``(image tensor C x H x W, label)``.

    With ``keep`` each transformed image is kept after its first use (for a deterministic transform of a small split:
    the digits demo spent an eighth of its wall time decoding and resizing the same 8x8 glyphs again)."""

    def __init__(
        self,
        source: ImageSource,
        indices: Ints,
        transform: Callable[[Image.Image], Any],
        keep: bool = False,
    ) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.kept: dict[int, torch.Tensor] | None = {} if keep else None

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[item])
        image = self.kept.get(index) if self.kept is not None else None
        if image is None:
            image = self.transform(self.source.image(index))
            if self.kept is not None:
                self.kept[index] = image
        return image, int(self.source.labels[index])


def split_indices(
    labels: Ints, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/val/test indices of ``labels``, the same for the same seed on every machine.

    Samples are shuffled within their class and then interleaved by their relative position in it, so every prefix of
    the order holds the classes in proportion; test takes the first ``round(n * test_fraction)``, val the next
    ``round(n * val_fraction)`` (at least one each when the fraction is not 0), train the rest.
    """
    labels = np.asarray(labels)
    total = len(labels)
    n_test = max(1, round(total * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(total * val_fraction)) if val_fraction > 0 else 0
    if n_test + n_val >= total:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training sample of {total}; "
            "lower them (together well below 1) or use a larger data set"
        )
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(total)
    position = np.empty(total)
    for label in np.unique(labels):
        members = shuffled[labels[shuffled] == label]
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = shuffled[np.argsort(position[shuffled], kind="stable")]
    test, val, train = np.split(order, [n_test, n_test + n_val])
    return np.sort(train), np.sort(val), np.sort(test)


class Part(NamedTuple):
    source: ImageSource
    indices: np.ndarray


class Loaded(NamedTuple):
    class_names: list[str]
    train: Part
    val: Part
    test: Part


def whole(source: ImageSource) -> Part:
    return Part(source, np.arange(len(source.labels)))
