"""The sources a run trains on (``data.source``), each loaded into its train, val and test parts, and how many classes
each has."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torchvision
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from vitpeer.peer.core.config import DataConfig
from vitpeer.peer.core.config.sections import SOURCES
from vitpeer.peer.core.data.huggingface import hf_columns, load_hf, open_hf, pick_hf_splits
from vitpeer.peer.core.data.splits import ArraySource, FileSource, Loaded, Part, split_indices, whole

FIXED_CLASS_COUNTS = {"digits": 10, "cifar10": 10, "cifar100": 100}
"""Sources whose number of classes is known without looking at any file."""


# --- what the classes know -------------------------------------------------------------------------------------------


def num_classes(config: DataConfig) -> int:
    """Number of classes of ``config.source``, found without loading images or building transforms."""
    if config.source in FIXED_CLASS_COUNTS:
        return FIXED_CLASS_COUNTS[config.source]
    if config.source == "imagefolder":
        return len(class_folders(required_dir(data_dir_of(config) / "train", IMAGEFOLDER_LAYOUT)))
    dataset = open_hf(config)
    train = pick_hf_splits(dataset, config.source)[0]
    _, label_column = hf_columns(train, config.source)
    return train.features[label_column].num_classes


def data_dir_of(config: DataConfig) -> Path:
    if config.data_dir is None:
        raise ValueError(
            f"data.source={config.source} reads its files from data.data_dir, which is not set; "
            "set data.data_dir to the folder that holds the data (only digits needs none)"
        )
    return Path(config.data_dir).expanduser()


def required_dir(path: Path, expected: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"folder {path} not found; expected {expected}")
    return path


# --- digits ----------------------------------------------------------------------------------------------------------


def _load_digits(config: DataConfig) -> Loaded:
    from sklearn.datasets import load_digits
    from sklearn.utils import Bunch

    # unannotated in sklearn, inferred as a Bunch or an (X, y) tuple; without return_X_y it is the Bunch
    digits: Bunch = load_digits()  # pyright: ignore[reportAssignmentType]
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    source = ArraySource(images, digits.target)
    train, val, test = split_indices(source.labels, config.val_fraction, config.test_fraction, config.split_seed)
    names = [str(name) for name in digits.target_names]
    return Loaded(names, Part(source, train), Part(source, val), Part(source, test))


# --- CIFAR -----------------------------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": (torchvision.datasets.CIFAR10, "labels"),
    "cifar100": (torchvision.datasets.CIFAR100, "fine_labels"),
}


def _load_cifar(config: DataConfig) -> Loaded:
    """Read CIFAR's python pickles; torchvision only downloads (and checks) them when ``download`` is on."""
    dataset_class, label_key = _CIFAR[config.source]
    root = data_dir_of(config)
    if config.download:
        dataset_class(root=str(root), train=False, download=True)
    folder = root / dataset_class.base_folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{config.source} not found: {folder} does not exist. Pass download=True (--download) to fetch it into "
            f"{root}, or put the extracted {dataset_class.base_folder} folder there"
        )
    train_images, train_labels = _read_cifar(folder, [name for name, _ in dataset_class.train_list], label_key)
    test_images, test_labels = _read_cifar(folder, [name for name, _ in dataset_class.test_list], label_key)
    class_names = list(_read_pickle(folder / dataset_class.meta["filename"])[dataset_class.meta["key"]])
    source = ArraySource(train_images, train_labels)
    train, val, _ = split_indices(source.labels, config.val_fraction, 0.0, config.split_seed)
    test = ArraySource(test_images, test_labels)
    return Loaded(class_names, Part(source, train), Part(source, val), whole(test))


def _read_cifar(folder: Path, files: list[str], label_key: str) -> tuple[np.ndarray, list[int]]:
    images, labels = [], []
    for name in files:
        batch = _read_pickle(folder / name)
        try:
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(int(label) for label in batch[label_key])
        except (KeyError, ValueError) as err:
            raise ValueError(f"{folder / name} is not a CIFAR batch ({err}); re-extract the archive") from err
    return np.concatenate(images), labels


def _read_pickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} is missing; re-extract the archive or pass download=True")
    with path.open("rb") as file:
        try:
            return pickle.load(file, encoding="latin1")
        except (pickle.UnpicklingError, EOFError) as err:
            raise ValueError(f"{path} is not a CIFAR pickle ({err}); re-extract the archive") from err


# --- image folders ---------------------------------------------------------------------------------------------------

IMAGEFOLDER_LAYOUT = "an ImageNet-style folder: data_dir/train/<class>/*.jpg and data_dir/val/<class>/*.jpg"


def class_folders(folder: Path) -> list[str]:
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"{folder} has no class folders; expected {IMAGEFOLDER_LAYOUT}")
    return names


def _image_files(folder: Path, class_names: list[str], allow_missing_classes: bool) -> FileSource:
    extra = sorted(set(class_folders(folder)) - set(class_names))
    if extra:
        raise ValueError(
            f"{folder} has classes that train/ lacks: {', '.join(extra)}; both need the same class folders"
        )
    class_to_idx = {name: index for index, name in enumerate(class_names)}
    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=allow_missing_classes)
    if not samples:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMG_EXTENSIONS)})")
    paths, labels = zip(*samples, strict=True)
    return FileSource(paths, labels)


def _load_imagefolder(config: DataConfig) -> Loaded:
    root = data_dir_of(config)
    train_dir = required_dir(root / "train", IMAGEFOLDER_LAYOUT)
    val_dir = required_dir(root / "val", IMAGEFOLDER_LAYOUT)
    class_names = class_folders(train_dir)
    train = _image_files(train_dir, class_names, allow_missing_classes=False)
    val = _image_files(val_dir, class_names, allow_missing_classes=True)
    test = _image_files(root / "test", class_names, allow_missing_classes=True) if (root / "test").is_dir() else val
    return Loaded(class_names, whole(train), whole(val), whole(test))


# --- Hugging Face datasets -------------------------------------------------------------------------------------------


def load_splits(config: DataConfig) -> Loaded:
    if config.source == "digits":
        return _load_digits(config)
    if config.source in _CIFAR:
        return _load_cifar(config)
    if config.source == "imagefolder":
        return _load_imagefolder(config)
    if config.source.startswith("hf:"):
        return load_hf(config)
    raise ValueError(
        f"unknown data source {config.source!r}; expected one of {', '.join(SOURCES)} or hf:<dataset name>"
    )


# --- transforms and the data module ----------------------------------------------------------------------------------
