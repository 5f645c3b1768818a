"""Training history: a real (tiny) Lightning run writes steps.csv, epochs.csv and history.json; ``vitpeer plot``
draws them, and refuses a directory that is not a run.

The model is a linear classifier on random vectors, logging what ``core.model.classifier.ImageClassifier`` logs. A
second
callback after ``History`` logs ``swarm/peers`` in ``on_train_batch_end`` as ``core.lightning.strategy._SwarmProgress``
does in a swarm: the step records must hold that batch's value, not the one before.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from vitpeer.peer.core.runtime.history import History, load_history

CLASSES, FEATURES, BATCH = 3, 8, 8
PLOT = ["-m", "vitpeer.peer.cli", "plot"]


class TinyClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(FEATURES, CLASSES)
        self.train_acc = MulticlassAccuracy(CLASSES, average="micro")
        self.val_acc = MulticlassAccuracy(CLASSES, average="micro")

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        logits = self.net(inputs)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        logits = self.net(inputs)
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels))
        self.log("val/acc", self.val_acc)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step / 10))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SwarmLike(pl.Callback):
    """Logs after ``History`` in the same hook, the way ``_SwarmProgress`` does (appended by the strategy)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("swarm/peers", float(trainer.global_step), on_step=True, on_epoch=False)


def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """8 training batches and 2 validation batches of a learnable problem (labels from a fixed linear map)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(80, FEATURES, generator=generator)
    labels = (inputs @ torch.randn(FEATURES, CLASSES, generator=generator)).argmax(dim=1)
    train, val = TensorDataset(inputs[:64], labels[:64]), TensorDataset(inputs[64:], labels[64:])
    return DataLoader(train, batch_size=BATCH, shuffle=True, generator=generator), DataLoader(val, batch_size=BATCH)


def fit(run_dir: Path, max_steps: int, ckpt_path: Path | None = None) -> pl.Trainer:
    """A CPU run: a step record every 5 local steps, a validation every epoch (8 steps)."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        log_every_n_steps=5,
        check_val_every_n_epoch=1,
        callbacks=[History(run_dir), SwarmLike()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(TinyClassifier(), *loaders(), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One 34-step run (not a multiple of 5: the last step is recorded on its own), then ``trainer.validate`` twice
    as ``vitpeer train`` does once: shared by the tests below."""
    out = tmp_path_factory.mktemp("run")
    trainer = fit(out, max_steps=34)
    for _ in range(2):  # the second measures the same weights at the same step again: not recorded
        trainer.validate(trainer.lightning_module, loaders()[1], verbose=False)
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.timeout(60)
def test_a_run_writes_steps_and_epochs_as_csv_and_json(run_dir: Path):
    history = load_history(run_dir)
    steps, epochs = history["steps"], history["epochs"]

    assert [record["local_step"] for record in steps] == [5, 10, 15, 20, 25, 30, 34]
    assert [record["step"] for record in steps] == [5, 10, 15, 20, 25, 30, 34]  # one optimizer step per batch
    times = [record["time"] for record in steps]
    assert times == sorted(times) and times[0] >= 0
    for record in steps:
        assert list(record)[:3] == ["step", "local_step", "time"]
        assert {"train/loss", "train/acc", "lr", "swarm/peers"} <= set(record)
        assert all(isinstance(record[key], float) and math.isfinite(record[key]) for key in ("train/loss", "lr"))
        assert 0 <= record["train/acc"] <= 1
        assert record["swarm/peers"] == record["step"]  # the batch's own value, logged after History's hook
        assert not any(key.startswith("val/") for key in record)
    assert steps[-1]["lr"] < steps[0]["lr"]  # the schedule decays

    # fit validates after each full epoch (none after the one max_steps cuts short); then trainer.validate
    assert [record["step"] for record in epochs] == [8, 16, 24, 32, 34]
    assert [record["epoch"] for record in epochs][:4] == [0, 1, 2, 3]  # fit's; after it Lightning says 5
    for record in epochs:
        assert list(record)[:3] == ["step", "epoch", "time"]
        assert {"val/loss", "val/acc", "train/loss"} <= set(record)
        assert math.isfinite(record["val/loss"]) and 0 <= record["val/acc"] <= 1
    assert epochs[-1]["train/loss"] == steps[-1]["train/loss"]  # the last before trainer.validate
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]  # it learned something

    rows = read_csv(run_dir / "history" / "steps.csv")
    assert [int(row["step"]) for row in rows] == [record["step"] for record in steps]
    assert list(rows[0])[0] == "step" and float(rows[-1]["train/loss"]) == pytest.approx(steps[-1]["train/loss"])
    rows = read_csv(run_dir / "history" / "epochs.csv")
    assert list(rows[0])[:3] == ["step", "epoch", "time"] and len(rows) == len(epochs)
    assert sorted(path.name for path in (run_dir / "history").iterdir()) == [
        "epochs.csv",
        "history.json",
        "steps.csv",
    ]  # no temporary file left behind


@pytest.mark.timeout(60)
def test_a_resumed_run_continues_the_history(tmp_path: Path):
    trainer = fit(tmp_path, max_steps=16)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    # what a crash after the checkpoint leaves: records past the checkpoint's step, which the resumed run drops
    stale = json.loads((tmp_path / "history" / "history.json").read_text())
    stale["steps"].append({"step": 99, "local_step": 99, "time": 1e6, "train/loss": 9.0})
    (tmp_path / "history" / "history.json").write_text(json.dumps(stale))

    fit(tmp_path, max_steps=24, ckpt_path=tmp_path / "last.ckpt")
    history = load_history(tmp_path)
    assert [record["step"] for record in history["steps"]] == [5, 10, 15, 16, 20, 24]
    assert [record["local_step"] for record in history["steps"]] == [5, 10, 15, 16, 20, 24]
    assert [record["step"] for record in history["epochs"]] == [8, 16, 24]
    times = [record["time"] for record in history["steps"]]
    assert times == sorted(times)


@pytest.mark.timeout(60)
def test_plot_draws_loss_accuracy_and_lr(run_dir: Path):
    import matplotlib.image

    done = subprocess.run([sys.executable, *PLOT, str(run_dir)], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    plots = run_dir / "plots"
    names = ("loss.png", "accuracy.png", "lr.png")
    assert done.stdout.split() == [str(plots / name) for name in names]
    for name in names:
        image = matplotlib.image.imread(plots / name)
        height, width, channels = image.shape
        assert width >= 400 and height >= 300 and channels in (3, 4), (name, image.shape)
        assert image.min() != image.max(), f"{name} is one colour"


@pytest.mark.timeout(60)
def test_plot_skips_a_figure_without_data(tmp_path: Path):
    (tmp_path / "history").mkdir()
    history = {"steps": [{"step": 1, "local_step": 1, "time": 0.1, "train/loss": 2.0}], "epochs": []}
    (tmp_path / "history" / "history.json").write_text(json.dumps(history))
    done = subprocess.run([sys.executable, *PLOT, str(tmp_path)], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == ["loss.png"]


@pytest.mark.timeout(60)
def test_plot_refuses_a_directory_without_history(tmp_path: Path):
    done = subprocess.run([sys.executable, *PLOT, str(tmp_path)], capture_output=True, text=True, timeout=50)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"Error: no history/history.json in {tmp_path}: is it a vitpeer run directory?"
    ]
    assert not (tmp_path / "plots").exists()
