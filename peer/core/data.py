"""Image data for a peer: where the samples come from, how they are split and batched.

Sources (``data.source``):

- ``digits``: scikit-learn's 1,797 handwritten 8x8 digits, shipped inside the package (no network, the demo).
- ``cifar10`` / ``cifar100``: the python version of CIFAR in ``data_dir``; the official test split is the test set.
- ``imagefolder``: ImageNet-style ``data_dir/train/<class>/*.jpg`` and ``data_dir/val/<class>/*``, optional ``test/``.
- ``hf:<name>``: a Hugging Face dataset, either a directory made with ``save_to_disk`` or a hub name (cached in
  ``data_dir``); the image and label columns are found from the features.

Every peer of a swarm holds out the same validation and test samples (the split is seeded with ``split_seed``) but
walks the training samples in its own order (``order_seed``), so peers never compute identical batches. Images are
RGB and transformed with timm's transforms for the model (``image_config`` from ``timm.data.resolve_data_config``).
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from vitpeer.peer.core.config import DataConfig

FIXED_CLASS_COUNTS = {"digits": 10, "cifar10": 10, "cifar100": 100}
"""Sources whose number of classes is known without looking at any file."""

TRAIN_SCALE = (0.5, 1.0)
"""Share of the image area kept by the training random-resized crop (light augmentation)."""

DIGITS_TRAIN_SCALE = (0.8, 1.0)
"""Gentler crops for the 8x8 digits, where a few pixels can hold a whole stroke."""

HF_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val"), "test": ("test",)}
"""Split names looked for in a Hugging Face dataset, in order of preference."""

HF_INSTALL_HINT = "pip install 'vitpeer[hf]'"


# --- what the classes know -------------------------------------------------------------------------------------------


def num_classes(config: DataConfig) -> int:
    """Number of classes of ``config.source``, found without loading images or building transforms."""
    if config.source in FIXED_CLASS_COUNTS:
        return FIXED_CLASS_COUNTS[config.source]
    if config.source == "imagefolder":
        return len(_class_folders(_required_dir(_data_dir(config) / "train", _IMAGEFOLDER_LAYOUT)))
    dataset = _open_hf(config)
    train = _pick_hf_splits(dataset, config.source)[0]
    _, label_column = _hf_columns(train, config.source)
    return train.features[label_column].num_classes


# --- samples ---------------------------------------------------------------------------------------------------------


class ImageSource(Protocol):
    """Indexable labelled images: ``labels[i]`` is the class of ``image(i)``."""

    labels: np.ndarray

    def image(self, index: int) -> Image.Image: ...


class ArraySource:
    """Images held in memory as uint8, N x H x W (grayscale) or N x H x W x 3."""

    def __init__(self, images: np.ndarray, labels: Sequence[int]) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")


class FileSource:
    """Image files on disk, read with PIL."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as img:
            return img.convert("RGB")


class HFSource:
    """A Hugging Face ``datasets.Dataset`` with an ``Image`` column and a ``ClassLabel`` column."""

    def __init__(self, dataset: Any, image_column: str, label_column: str) -> None:
        self.dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        self.labels = np.asarray(dataset[label_column], dtype=np.int64)

    def image(self, index: int) -> Image.Image:
        return self.dataset[index][self.image_column].convert("RGB")


class ImageSplit(Dataset):
    """The samples ``indices`` of a source, transformed: items are ``(image tensor C x H x W, label)``.

    With ``keep`` each transformed image is kept after its first use (for a deterministic transform of a small split:
    the digits demo spent an eighth of its wall time decoding and resizing the same 8x8 glyphs again)."""

    def __init__(
        self,
        source: ImageSource,
        indices: Sequence[int],
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
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
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


class _Part(NamedTuple):
    source: ImageSource
    indices: np.ndarray


class _Loaded(NamedTuple):
    class_names: list[str]
    train: _Part
    val: _Part
    test: _Part


def _whole(source: ImageSource) -> _Part:
    return _Part(source, np.arange(len(source.labels)))


def _data_dir(config: DataConfig) -> Path:
    if config.data_dir is None:
        raise ValueError(
            f"data.source={config.source} reads its files from data.data_dir, which is not set; "
            "set data.data_dir to the folder that holds the data (only digits needs none)"
        )
    return Path(config.data_dir).expanduser()


def _required_dir(path: Path, expected: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"folder {path} not found; expected {expected}")
    return path


# --- digits ----------------------------------------------------------------------------------------------------------


def _load_digits(config: DataConfig) -> _Loaded:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    source = ArraySource(images, digits.target)
    train, val, test = split_indices(source.labels, config.val_fraction, config.test_fraction, config.split_seed)
    names = [str(name) for name in digits.target_names]
    return _Loaded(names, _Part(source, train), _Part(source, val), _Part(source, test))


# --- CIFAR -----------------------------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": (torchvision.datasets.CIFAR10, "labels"),
    "cifar100": (torchvision.datasets.CIFAR100, "fine_labels"),
}


def _load_cifar(config: DataConfig) -> _Loaded:
    """Read CIFAR's python pickles; torchvision only downloads (and checks) them when ``download`` is on."""
    dataset_class, label_key = _CIFAR[config.source]
    root = _data_dir(config)
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
    return _Loaded(class_names, _Part(source, train), _Part(source, val), _whole(test))


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

_IMAGEFOLDER_LAYOUT = "an ImageNet-style folder: data_dir/train/<class>/*.jpg and data_dir/val/<class>/*.jpg"


def _class_folders(folder: Path) -> list[str]:
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"{folder} has no class folders; expected {_IMAGEFOLDER_LAYOUT}")
    return names


def _image_files(folder: Path, class_names: list[str], allow_missing_classes: bool) -> FileSource:
    extra = sorted(set(_class_folders(folder)) - set(class_names))
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


def _load_imagefolder(config: DataConfig) -> _Loaded:
    root = _data_dir(config)
    train_dir = _required_dir(root / "train", _IMAGEFOLDER_LAYOUT)
    val_dir = _required_dir(root / "val", _IMAGEFOLDER_LAYOUT)
    class_names = _class_folders(train_dir)
    train = _image_files(train_dir, class_names, allow_missing_classes=False)
    val = _image_files(val_dir, class_names, allow_missing_classes=True)
    test = _image_files(root / "test", class_names, allow_missing_classes=True) if (root / "test").is_dir() else val
    return _Loaded(class_names, _whole(train), _whole(val), _whole(test))


# --- Hugging Face datasets -------------------------------------------------------------------------------------------


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


def _open_hf(config: DataConfig) -> Any:
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


def _pick_hf_splits(dataset: Any, source: str) -> tuple[Any, Any | None, Any | None]:
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


def _hf_columns(dataset: Any, source: str) -> tuple[str, str]:
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


def _load_hf(config: DataConfig) -> _Loaded:
    train, val, test = _pick_hf_splits(_open_hf(config), config.source)
    image_column, label_column = _hf_columns(train, config.source)
    class_names = list(train.features[label_column].names)
    source = HFSource(train, image_column, label_column)
    carve_val = config.val_fraction if val is None else 0.0
    carve_test = config.test_fraction if test is None else 0.0
    train_idx, val_idx, test_idx = split_indices(source.labels, carve_val, carve_test, config.split_seed)
    return _Loaded(
        class_names,
        _Part(source, train_idx),
        _Part(source, val_idx) if val is None else _whole(HFSource(val, image_column, label_column)),
        _Part(source, test_idx) if test is None else _whole(HFSource(test, image_column, label_column)),
    )


def _load(config: DataConfig) -> _Loaded:
    if config.source == "digits":
        return _load_digits(config)
    if config.source in _CIFAR:
        return _load_cifar(config)
    if config.source == "imagefolder":
        return _load_imagefolder(config)
    if config.source.startswith("hf:"):
        return _load_hf(config)
    raise ValueError(
        f"unknown data source {config.source!r}; expected digits, cifar10, cifar100, imagefolder or hf:<name>"
    )


# --- transforms and the data module ----------------------------------------------------------------------------------


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
    return (train if augment else evaluate), evaluate


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
        loaded = _load(self.config)
        self.class_names = loaded.class_names
        self.train_set = ImageSplit(*loaded.train, self.train_transform, self._keeps(loaded.train, self.config.augment))
        self.val_set = ImageSplit(*loaded.val, self.eval_transform, self._keeps(loaded.val, False))
        self.test_set = ImageSplit(*loaded.test, self.eval_transform, self._keeps(loaded.test, False))
        if len(self.train_set) < self.config.batch_size:
            raise ValueError(
                f"the training split has {len(self.train_set)} samples, fewer than data.batch_size="
                f"{self.config.batch_size}; lower the batch size or use more data"
            )

    def _keeps(self, part: _Part, augmented: bool) -> bool:
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
