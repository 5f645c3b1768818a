"""Hugging Face datasets as a source (``hf:<name>``): a ``save_to_disk`` directory or a hub name cached in
``data_dir``; the image and label columns are found from the features."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitpeer.peer.core.config import DataConfig
from vitpeer.peer.core.data.splits import Loaded, Part, split_indices, whole

HF_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val"), "test": ("test",)}
"""Split names looked for in a Hugging Face dataset, in order of preference."""

HF_INSTALL_HINT = "pip install 'vitpeer[hf]'"


class HFSource:
    """A Hugging Face ``datasets.Dataset`` with an ``Image`` column and a ``ClassLabel`` column."""

    def __init__(self, dataset: Any, image_column: str, label_column: str) -> None:
        self.dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        self.labels = np.asarray(dataset[label_column], dtype=np.int64)

    def image(self, index: int) -> Image.Image:
        return self.dataset[index][self.image_column].convert("RGB")


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"the hf: data sources need the Hugging Face datasets package: {HF_INSTALL_HINT}") from err
    return datasets


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Keep ``datasets`` and ``huggingface_hub`` off the network (their offline mode) for the duration."""
    import datasets.config
    import huggingface_hub.constants

    flags = [
        (module, name)
        for module in (datasets.config, huggingface_hub.constants)
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if hasattr(module, name)
    ]
    saved = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved, strict=True):
            setattr(module, name, value)


def _saved_dataset_dir(name: str, data_dir: Path | None) -> Path | None:
    """The directory ``name`` (or ``data_dir/name``) when it holds a dataset written by ``save_to_disk``."""
    for candidate in (Path(name).expanduser(), data_dir / name if data_dir else None):
        if candidate and ((candidate / "dataset_dict.json").is_file() or (candidate / "state.json").is_file()):
            return candidate
    return None


def open_hf(config: DataConfig) -> Any:
    """The ``DatasetDict`` (or single ``Dataset``) named by ``hf:<name>``, from disk or the hub cache."""
    datasets = _import_datasets()
    name = config.source.removeprefix("hf:")
    data_dir = Path(config.data_dir).expanduser() if config.data_dir else None
    saved = _saved_dataset_dir(name, data_dir)
    if saved is not None:
        return datasets.load_from_disk(str(saved))
    cache_dir = str(data_dir) if data_dir else None
    if config.download or Path(name).is_dir():
        return datasets.load_dataset(name, cache_dir=cache_dir)
    try:
        with _hf_offline():
            return datasets.load_dataset(name, cache_dir=cache_dir)
    except Exception as err:
        where = cache_dir or "the default Hugging Face cache"
        raise FileNotFoundError(
            f"Hugging Face dataset {name!r} is not cached in {where} and downloading is off ({err}). Pass "
            "download=True (--download) to fetch it, or use hf:<directory> of a dataset saved with save_to_disk"
        ) from err


def pick_hf_splits(dataset: Any, source: str) -> tuple[Any, Any | None, Any | None]:
    """The train, validation and test splits of a loaded dataset; None for a split it does not have."""
    splits = dict(dataset) if hasattr(dataset, "keys") else {"train": dataset}
    found = {
        role: next((splits[name] for name in names if name in splits), None) for role, names in HF_SPLIT_NAMES.items()
    }
    if found["train"] is None:
        if len(splits) != 1:
            raise ValueError(
                f"{source} has no 'train' split (it has {', '.join(splits)}); cannot tell what to train on"
            )
        found["train"] = next(iter(splits.values()))
    return found["train"], found["val"], found["test"]


def hf_columns(dataset: Any, source: str) -> tuple[str, str]:
    """Names of the first ``Image`` column and the first ``ClassLabel`` column."""
    datasets = _import_datasets()
    features = dataset.features
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    labels = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if not images or not labels:
        raise ValueError(
            f"{source} needs an Image column and a ClassLabel column, but its features are {dict(features)}; "
            "cast the label column with dataset.cast_column(name, ClassLabel(names=[...]))"
        )
    return images[0], labels[0]


def load_hf(config: DataConfig) -> Loaded:
    train, val, test = pick_hf_splits(open_hf(config), config.source)
    image_column, label_column = hf_columns(train, config.source)
    class_names = list(train.features[label_column].names)
    source = HFSource(train, image_column, label_column)
    carve_val = config.val_fraction if val is None else 0.0
    carve_test = config.test_fraction if test is None else 0.0
    train_idx, val_idx, test_idx = split_indices(source.labels, carve_val, carve_test, config.split_seed)
    return Loaded(
        class_names,
        Part(source, train_idx),
        Part(source, val_idx) if val is None else whole(HFSource(val, image_column, label_column)),
        Part(source, test_idx) if test is None else whole(HFSource(test, image_column, label_column)),
    )
