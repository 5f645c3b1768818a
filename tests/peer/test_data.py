"""Tests of core.data on real files the tests write themselves: digits, CIFAR pickles, PNG folders, HF datasets."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.transforms import RandomHorizontalFlip

from vitpeer.peer.core.config import DataConfig
from vitpeer.peer.core.data import VisionDataModule, build_transforms, num_classes, split_indices

IMAGE_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}
COLORS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
"""Image-folder classes: every image of a class is filled with its color, so labels can be checked from pixels."""


def image_config(size: int) -> dict:
    return {**IMAGE_CONFIG, "input_size": (3, size, size)}


def datamodule(order_seed: int = 0, config: dict | None = None, **fields) -> VisionDataModule:
    module = VisionDataModule(DataConfig(**fields), config or IMAGE_CONFIG, order_seed=order_seed)
    module.setup("fit")
    return module


def first_batch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    random.seed(0)
    torch.manual_seed(0)
    return next(iter(loader))


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    return images * 0.5 + 0.5


# --- split_indices ---------------------------------------------------------------------------------------------------


def test_split_indices_is_a_stratified_partition():
    labels = np.repeat(np.arange(4), [40, 40, 20, 100])
    train, val, test = split_indices(labels, 0.2, 0.1, seed=3)
    assert (len(train), len(val), len(test)) == (140, 40, 20)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(200))
    assert np.bincount(labels[val], minlength=4).tolist() == [8, 8, 4, 20]
    assert np.bincount(labels[test], minlength=4).tolist() == [4, 4, 2, 10]
    again = split_indices(labels, 0.2, 0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not np.array_equal(split_indices(labels, 0.2, 0.1, seed=4)[1], val)


def test_split_indices_keeps_one_sample_per_nonzero_fraction_and_rejects_an_empty_train_split():
    train, val, test = split_indices([0, 1, 0, 1, 0], 0.01, 0.0, seed=0)
    assert (len(train), len(val), len(test)) == (4, 1, 0)
    with pytest.raises(ValueError, match="val_fraction=0.5 and test_fraction=0.5"):
        split_indices([0, 1, 0, 1], 0.5, 0.5, seed=0)


# --- digits ----------------------------------------------------------------------------------------------------------


def test_digits_batches_have_model_shape_dtype_and_labels():
    module = datamodule(batch_size=16, eval_batch_size=50)
    images, labels = first_batch(module.train_dataloader())
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 10
    assert -1.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.1
    val_images, val_labels = first_batch(module.val_dataloader())
    assert val_images.shape == (50, 3, 32, 32) and val_labels.shape == (50,)
    assert module.num_classes == 10 and module.class_names == [str(d) for d in range(10)]
    train_set = module.train_set
    module.setup("validate")  # Lightning calls setup per stage: the data is loaded and split once
    assert module.train_set is train_set
    assert len(module.train_dataloader()) == len(module.train_set) // 16  # drop_last


def test_digits_images_are_the_real_digits_scaled_to_rgb():
    module = datamodule(config=image_config(8))
    digits = load_digits()
    images, labels = next(iter(module.test_dataloader()))
    originals = digits.images[module.test_set.indices[: len(labels)]] / 16
    assert torch.equal(labels, torch.as_tensor(digits.target[module.test_set.indices[: len(labels)]]))
    pixels = unnormalize(images)
    assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 0], pixels[:, 2])
    assert torch.allclose(pixels[:, 0], torch.as_tensor(originals, dtype=torch.float32), atol=1 / 255 + 1e-6)


def test_digits_split_is_disjoint_stratified_and_the_same_for_every_order_seed():
    first = datamodule(order_seed=1)
    second = datamodule(order_seed=2)
    parts = [first.train_set.indices, first.val_set.indices, first.test_set.indices]
    assert sum(len(part) for part in parts) == 1797
    assert len(np.unique(np.concatenate(parts))) == 1797
    assert len(first.val_set) == len(first.test_set) == round(1797 * 0.15)
    theirs_parts = [second.train_set.indices, second.val_set.indices, second.test_set.indices]
    for mine, theirs in zip(parts, theirs_parts, strict=True):
        assert np.array_equal(mine, theirs)
    assert np.bincount(first.val_set.labels, minlength=10).min() >= 26
    other = datamodule(split_seed=1)
    assert not np.array_equal(other.val_set.indices, first.val_set.indices)


def test_order_seed_sets_the_training_order_and_epochs_differ():
    same = [first_batch(datamodule(order_seed=7).train_dataloader()) for _ in range(2)]
    assert torch.equal(same[0][1], same[1][1]) and torch.equal(same[0][0], same[1][0])
    other_images, other_labels = first_batch(datamodule(order_seed=8).train_dataloader())
    assert not torch.equal(other_labels, same[0][1])
    loader = datamodule(order_seed=7).train_dataloader()
    epochs = [torch.cat([labels for _, labels in loader]) for _ in range(2)]
    assert not torch.equal(epochs[0], epochs[1])


def test_evaluation_batches_are_deterministic():
    module = datamodule(order_seed=1)
    runs = [torch.cat([images for images, _ in module.val_dataloader()]) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_fixed_transforms_of_small_in_memory_splits_are_kept_and_augmented_ones_are_not():
    fixed = datamodule(order_seed=3, augment=False)
    assert all(split.kept is not None for split in (fixed.train_set, fixed.val_set, fixed.test_set))
    fresh = datamodule(order_seed=3, augment=False)
    fresh.train_set.kept = None  # every image transformed again from its source
    kept_loader, fresh_loader = fixed.train_dataloader(), fresh.train_dataloader()
    kept = [batch for _ in range(2) for batch in kept_loader]  # the second epoch is served from what was kept
    made = [batch for _ in range(2) for batch in fresh_loader]
    assert len(fixed.train_set.kept) == len(fixed.train_set) and not fresh.train_set.kept
    for (images, labels), (made_images, made_labels) in zip(kept, made, strict=True):
        assert torch.equal(images, made_images) and torch.equal(labels, made_labels)
    augmented = datamodule(augment=True)
    assert augmented.train_set.kept is None and augmented.val_set.kept is not None
    big = datamodule(augment=False, config=image_config(224))  # 1437 x 3 x 224 x 224 floats: 865 MiB
    assert big.train_set.kept is None


def test_digits_are_not_flipped_but_photos_are():
    def flips(source: str) -> bool:
        train, evaluate = build_transforms(IMAGE_CONFIG, source)
        assert not any(isinstance(step, RandomHorizontalFlip) for step in evaluate.transforms)
        return any(isinstance(step, RandomHorizontalFlip) and step.p > 0 for step in train.transforms)

    assert not flips("digits")
    assert flips("cifar10") and flips("imagefolder")


def test_non_rgb_input_size_and_a_batch_larger_than_the_train_split_are_rejected():
    with pytest.raises(ValueError, match="1 channels"):
        VisionDataModule(DataConfig(), image_config(32) | {"input_size": (1, 32, 32)}, order_seed=0)
    with pytest.raises(ValueError, match="batch_size=5000"):
        datamodule(batch_size=5000)


# --- CIFAR -----------------------------------------------------------------------------------------------------------


def write_cifar(root: Path, per_file: int = 20, cifar100: bool = False) -> dict[str, dict]:
    """A CIFAR directory in the python format of the real archive, with random images; returns what it wrote."""
    rng = np.random.default_rng(0)
    classes = 100 if cifar100 else 10
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = ["train", "test"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    label_key = "fine_labels" if cifar100 else "labels"
    written = {}
    for name in files:
        count = per_file * (5 if cifar100 and name == "train" else 1)
        batch = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            label_key: [i % classes for i in range(count)],
        }
        written[name] = batch
        (folder / name).write_bytes(pickle.dumps(batch))
    meta_name, meta_key = ("meta", "fine_label_names") if cifar100 else ("batches.meta", "label_names")
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"class{i}" for i in range(classes)]}))
    return written


def test_cifar10_from_a_local_directory(tmp_path):
    written = write_cifar(tmp_path)
    module = datamodule(source="cifar10", data_dir=tmp_path, batch_size=8, config=image_config(40))
    assert module.class_names == [f"class{i}" for i in range(10)] and module.num_classes == 10
    assert len(module.train_set) + len(module.val_set) == 100 and len(module.val_set) == 15
    assert len(module.test_set) == 20
    images, labels = first_batch(module.train_dataloader())
    assert images.shape == (8, 3, 40, 40) and labels.dtype == torch.int64
    test_images, test_labels = next(iter(module.test_dataloader()))
    assert test_images.shape == (8, 3, 40, 40)
    assert test_labels.tolist() == written["test_batch"]["labels"][:8]


def test_cifar_pixels_keep_their_channel_layout(tmp_path):
    written = write_cifar(tmp_path)
    module = datamodule(source="cifar10", data_dir=tmp_path, batch_size=4, eval_batch_size=20)
    images, _ = next(iter(module.test_dataloader()))
    expected = written["test_batch"]["data"].reshape(20, 3, 32, 32) / 255
    assert torch.allclose(unnormalize(images), torch.as_tensor(expected, dtype=torch.float32), atol=1e-5)


def test_cifar100_reads_fine_labels(tmp_path):
    write_cifar(tmp_path, cifar100=True)
    module = datamodule(source="cifar100", data_dir=tmp_path, batch_size=8)
    assert module.num_classes == 100 and len(module.test_set) == 20
    assert len(module.train_set) + len(module.val_set) == 100
    assert sorted(module.test_set.labels.tolist()) == list(range(20))


def test_missing_cifar_without_download_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        datamodule(source="cifar10", data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "download=True" in message and "cifar-10-batches-py" in message
    with pytest.raises(ValueError, match="data_dir"):
        datamodule(source="cifar10")


# --- image folders ---------------------------------------------------------------------------------------------------


def write_image_folder(root: Path, counts: dict[str, int]) -> None:
    for split, count in counts.items():
        for name, color in COLORS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                size = (20 + 3 * i, 24)  # not square and not the model size
                Image.new("RGB", size, color).save(root / split / name / f"{i}.png")


def dominant_class(images: torch.Tensor) -> list[str]:
    """Name of the color of each image (channel order R, G, B)."""
    by_channel = {0: "red", 1: "green", 2: "blue"}
    return [by_channel[int(channel)] for channel in unnormalize(images).mean(dim=(2, 3)).argmax(dim=1)]


def test_imagefolder_batches_and_labels_match_the_folders(tmp_path):
    write_image_folder(tmp_path, {"train": 4, "val": 2})
    module = datamodule(source="imagefolder", data_dir=tmp_path, batch_size=4, config=image_config(24))
    assert module.class_names == ["blue", "green", "red"] and module.num_classes == 3
    assert (len(module.train_set), len(module.val_set)) == (12, 6)
    images, labels = first_batch(module.train_dataloader())
    assert images.shape == (4, 3, 24, 24)
    assert dominant_class(images) == [module.class_names[label] for label in labels]
    assert len(module.test_set) == 6  # no test/: val doubles as test
    val_images, val_labels = next(iter(module.val_dataloader()))
    assert dominant_class(val_images) == [module.class_names[label] for label in val_labels]


def test_imagefolder_uses_a_test_folder_when_present(tmp_path):
    write_image_folder(tmp_path, {"train": 3, "val": 1, "test": 2})
    module = datamodule(source="imagefolder", data_dir=tmp_path, batch_size=4)
    assert (len(module.train_set), len(module.val_set), len(module.test_set)) == (9, 3, 6)
    assert all("/test/" in path for path in module.test_set.source.paths)


def test_imagefolder_errors_name_the_missing_folder_or_the_stray_class(tmp_path):
    write_image_folder(tmp_path, {"train": 2})
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val")):
        datamodule(source="imagefolder", data_dir=tmp_path, batch_size=2)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere" / "train")):
        num_classes(DataConfig(source="imagefolder", data_dir=tmp_path / "elsewhere"))
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "zebra" / "0.png")
    with pytest.raises(ValueError, match="zebra"):
        datamodule(source="imagefolder", data_dir=tmp_path, batch_size=2)


# --- Hugging Face datasets -------------------------------------------------------------------------------------------


def hf_dataset(count: int, mode: str = "RGB"):
    """A tiny dataset with an extra column first, an Image column and a ClassLabel column under unusual names."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "picture": datasets.Image(),
            "kind": datasets.ClassLabel(names=["angular_leaf_spot", "bean_rust", "healthy"]),
        }
    )
    rows = {
        "id": list(range(count)),
        "picture": [
            Image.new(mode, (12 + i % 5, 10), (i * 7) % 256 if mode == "L" else (i, 0, 0)) for i in range(count)
        ],
        "kind": [i % 3 for i in range(count)],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def test_hf_saved_dataset_dict_uses_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "beans"
    datasets.DatasetDict(train=hf_dataset(12), validation=hf_dataset(6), test=hf_dataset(3)).save_to_disk(str(path))
    config = {"source": f"hf:{path}", "batch_size": 4}
    assert num_classes(DataConfig(**config)) == 3
    module = datamodule(**config)
    assert module.class_names == ["angular_leaf_spot", "bean_rust", "healthy"] and module.num_classes == 3
    assert (len(module.train_set), len(module.val_set), len(module.test_set)) == (12, 6, 3)
    images, labels = first_batch(module.train_dataloader())
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64 and labels.max() < 3
    assert module.test_set.labels.tolist() == [0, 1, 2]


def test_hf_single_grayscale_dataset_gets_val_and_test_carved_out(tmp_path):
    path = tmp_path / "gray"
    hf_dataset(40, mode="L").save_to_disk(str(path))
    module = datamodule(source=f"hf:{path}", batch_size=4, val_fraction=0.2, test_fraction=0.1)
    parts = [module.train_set.indices, module.val_set.indices, module.test_set.indices]
    assert [len(part) for part in parts] == [28, 8, 4]
    assert len(np.unique(np.concatenate(parts))) == 40
    images, _ = next(iter(module.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and torch.equal(images[:, 0], images[:, 2])


def test_hf_dataset_without_a_class_label_is_rejected(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "unlabelled"
    hf_dataset(6).cast_column("kind", datasets.Value("int64")).save_to_disk(str(path))
    with pytest.raises(ValueError, match="ClassLabel"):
        datamodule(source=f"hf:{path}", batch_size=2)


@pytest.mark.timeout(30)  # offline mode makes no connection attempt; without it a machine with no network waits
def test_hf_hub_name_loads_from_the_cache_offline_and_fails_clearly_when_not_cached(tmp_path):
    datasets = pytest.importorskip("datasets")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    # Build a cache as load_dataset("tiny-beans") leaves it: <cache>/tiny-beans/default/0.0.0/<hash>/.
    hf_dataset(9).to_parquet(str(tmp_path / "train.parquet"))
    datasets.load_dataset(
        "parquet", data_files={"train": str(tmp_path / "train.parquet")}, cache_dir=str(tmp_path / "b")
    )
    (built,) = [path for path in (tmp_path / "b" / "parquet").glob("*/*/*") if path.is_dir()]
    cached = tmp_path / "cache" / "tiny-beans" / "default" / "0.0.0" / built.name
    shutil.copytree(built, cached, ignore=shutil.ignore_patterns("*.lock"))
    (cached / "parquet-train.arrow").rename(cached / "tiny-beans-train.arrow")

    offline_flags = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    config = {"source": "hf:tiny-beans", "data_dir": tmp_path / "cache", "batch_size": 2}
    assert num_classes(DataConfig(**config)) == 3
    module = datamodule(**config)
    assert len(module.train_set) + len(module.val_set) + len(module.test_set) == 9
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == offline_flags  # restored

    with pytest.raises(FileNotFoundError, match="'not-cached'.*download=True"):
        num_classes(DataConfig(source="hf:not-cached", data_dir=tmp_path / "cache"))


# --- num_classes -----------------------------------------------------------------------------------------------------


def test_num_classes_of_the_built_in_sources_needs_no_files(tmp_path):
    assert num_classes(DataConfig(source="digits")) == 10
    assert num_classes(DataConfig(source="cifar10", data_dir=tmp_path / "nothing")) == 10
    assert num_classes(DataConfig(source="cifar100", data_dir=tmp_path / "nothing")) == 100
    write_image_folder(tmp_path, {"train": 1})
    assert num_classes(DataConfig(source="imagefolder", data_dir=tmp_path)) == 3
