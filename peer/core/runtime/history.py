"""A run's training history on disk (CSV + JSON) and ``vitpeer plot RUN_DIR``, which draws it.

``History`` is a Lightning callback that both ``vitpeer train`` and ``vitpeer join`` attach. It writes, on global
rank 0 only, into ``RUN_DIR/history/``:

- ``steps.csv``: one row every ``trainer.log_every_n_steps`` local steps (and one for the last): ``step`` (Lightning's
  ``global_step``; in a swarm the swarm step), ``local_step`` (batches this process trained), ``time`` (seconds
  since training started), then every logged ``train/*``, ``lr``, ``swarm/*`` and ``epoch`` scalar;
- ``epochs.csv``: one row per validation: ``step``, ``epoch`` (Lightning's ``current_epoch``, passes over the
  data), ``time``, every ``val/*`` scalar and the latest ``train/loss``;
- ``history.json``: ``{"steps": [...], "epochs": [...]}``, the same records, the file ``load_history`` and
  ``plot_history`` read.

A CSV header is the union of the keys seen so far (``step`` first, then in order of first appearance); a record
without some key leaves its cell empty. The three files are rewritten whole at every validation, at the end of
training and when training fails, each through a temporary file and ``os.replace``: a crash leaves the last complete
files, never a half-written one. Non-finite numbers (a diverged loss) are ``null`` in the JSON, so any strict JSON
reader accepts it, and ``nan``/``inf`` in the CSV.

A run resumed from a checkpoint (``--resume``) keeps the records up to the checkpoint's step and continues ``time``
and ``local_step`` from the last of them; a fresh run into the same directory starts a fresh history.

``plot_history`` turns ``history.json`` into ``RUN_DIR/plots/{loss,accuracy,lr}.png``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)

HISTORY_DIR = "history"
PLOTS_DIR = "plots"

Record = dict[str, float | int | None]  # None: a non-finite number read back from history.json


def _is_step_metric(key: str) -> bool:
    """The logged keys a per-step record keeps: the module's training numbers and the swarm's."""
    return key.startswith(("train/", "swarm/")) or key in ("lr", "epoch")


def _scalars(metrics: dict[str, Any], keep: Callable[[str], bool]) -> dict[str, float]:
    """``metrics``' one-element tensors and Python numbers whose key ``keep`` accepts, as floats, sorted by key."""
    found = {}
    for key in sorted(metrics):
        value = metrics[key]
        if not keep(key):
            continue
        if hasattr(value, "numel") and hasattr(value, "item"):  # a tensor
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[key] = float(value)
    return found


class History(pl.Callback):
    """Records the run's metrics into ``out/history/`` (see the module docstring for the files and their keys).

    Why a step record is taken one hook late: in a swarm, ``core.lightning.strategy._SwarmProgress`` is appended to the
    trainer's callbacks when the strategy is set up, so it runs *after* this callback in every hook. Its
    ``on_train_batch_end`` is what moves ``global_step`` to the swarm step and logs ``swarm/*``, ``lr`` and
    ``epoch``. So ``on_train_batch_end`` here only notes that the batch is due (and its time); the record itself is
    read at the next hook that runs after every callback is done with that batch (the next batch's start, a
    validation's end, the end of training), when ``trainer.callback_metrics`` holds that batch's values. Outside a
    swarm the result is the same as reading them at once.

    ``out``: the run directory (``trainer.output_dir``); the files go to ``out/history/``.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.dir = self.out / HISTORY_DIR
        self.steps: list[Record] = []
        self.epochs: list[Record] = []
        self._started: float | None = None  # time.monotonic() at train start, minus the resumed run's time
        self._batches = 0  # local steps, counted from the resumed run's last local_step
        self._pending: tuple[int, float, bool] | None = None  # (local_step, time, due) of the last unrecorded batch
        self._train_loss: float | None = None  # the latest train/loss seen, for validations after training

    # --- Lightning hooks --------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps, self.epochs, self._batches, self._pending = [], [], 0, None
        elapsed = 0.0
        if trainer.is_global_zero and trainer.ckpt_path is not None and (self.dir / "history.json").is_file():
            elapsed = self._resume(trainer.global_step)
        self._started = time.monotonic() - elapsed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        self._flush(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        self._batches += 1
        every = trainer.log_every_n_steps  # pyright: ignore[reportAttributeAccessIssue]  # Lightning sets it undeclared
        due = self._batches % max(1, every) == 0
        self._pending = (self._batches, self._elapsed(), due)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the validation epoch's last ``log`` call (the module's and other callbacks' ``on_validation_epoch
        _end`` included, which ``on_validation_epoch_end`` here would miss), before ``ModelCheckpoint`` saves: the
        files on disk are never behind the newest checkpoint."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._flush(trainer)
        if trainer.state.fn == "validate" and self.epochs and self.epochs[-1]["step"] == trainer.global_step:
            return  # ``trainer.validate`` after ``fit`` on the weights fit's last validation already measured
        metrics = trainer.callback_metrics
        record: Record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "time": self._elapsed()}
        record.update(_scalars(metrics, lambda key: key.startswith("val/")))
        train_loss = _scalars(metrics, lambda key: key == "train/loss").get("train/loss", self._train_loss)
        if train_loss is not None:
            record["train/loss"] = train_loss
        self.epochs.append(record)
        self.write()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, last=True)
        if trainer.is_global_zero:
            self.write()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Keep what was recorded since the last validation; a failure to write must not hide the run's error."""
        if trainer.is_global_zero and (self.steps or self.epochs):
            try:
                self.write()
            except OSError as err:
                log.warning("could not write the training history to %s: %s", self.dir, err)

    # --- records and files ------------------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._started, 3) if self._started is not None else 0.0

    def _flush(self, trainer: pl.Trainer, last: bool = False) -> None:
        """Record the pending batch if it is due, or if it is the ``last``: the final batch is always recorded. One
        that is not due stays pending until the next batch replaces it or training ends."""
        if self._pending is None or not (self._pending[2] or last):
            return
        local_step, elapsed, _ = self._pending
        self._pending = None
        if not trainer.is_global_zero:
            return
        record: Record = {"step": trainer.global_step, "local_step": local_step, "time": elapsed}
        record.update(_scalars(trainer.callback_metrics, _is_step_metric))
        self._train_loss = record.get("train/loss", self._train_loss)
        self.steps.append(record)

    def _resume(self, step: int) -> float:
        """Take the earlier run's records up to ``step``; return its training time so far."""
        try:
            earlier = load_history(self.out)
        except (OSError, ValueError) as err:
            log.warning("not continuing the earlier training history (%s); starting a new one", err)
            return 0.0
        self.steps, self.epochs = _up_to(earlier["steps"], step), _up_to(earlier["epochs"], step)
        if self.steps:
            self._batches = int(self.steps[-1].get("local_step") or 0)
        times = [record.get("time") or 0.0 for record in self.steps + self.epochs]
        return max(times, default=0.0)

    def write(self) -> None:
        """Rewrite ``steps.csv``, ``epochs.csv`` and ``history.json`` from the records, each atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        _replace(self.dir / "steps.csv", _csv(self.steps))
        _replace(self.dir / "epochs.csv", _csv(self.epochs))
        history = {"steps": [_finite(r) for r in self.steps], "epochs": [_finite(r) for r in self.epochs]}
        _replace(self.dir / "history.json", json.dumps(history, indent=1, allow_nan=False) + "\n")


def _csv(records: list[Record]) -> str:
    """The records as CSV text; the header is the union of their keys in order of first appearance."""
    header: dict[str, None] = {"step": None}  # an ordered set
    for record in records:
        header.update(dict.fromkeys(record))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(header), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return text.getvalue()


def _up_to(records: list[dict[str, Any]], step: int) -> list[Record]:
    """The records taken at ``step`` or before."""
    return [record for record in records if isinstance(record.get("step"), int | float) and record["step"] <= step]


def _finite(record: Record) -> Record:
    """The record with NaN and infinities as None (JSON's null)."""
    return {key: value if value is None or math.isfinite(value) else None for key, value in record.items()}


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_history(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """``RUN_DIR/history/history.json``: ``{"steps": [...], "epochs": [...]}``.

    Raises FileNotFoundError when the run has none, ValueError when the file is not a history."""
    path = Path(run_dir) / HISTORY_DIR / "history.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {HISTORY_DIR}/history.json in {run_dir}: is it a vitpeer run directory?")
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(history, dict) or not all(isinstance(history.get(k, []), list) for k in ("steps", "epochs")):
        raise ValueError(f"{path} is not a training history: expected {{'steps': [...], 'epochs': [...]}}")
    return {"steps": history.get("steps", []), "epochs": history.get("epochs", [])}


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that have a finite ``key``."""
    points = [
        (record["step"], record[key])
        for record in records
        if isinstance(record.get(key), int | float) and math.isfinite(record[key]) and "step" in record
    ]
    return [step for step, _ in points], [value for _, value in points]


# figure file -> (title, y label, [(label, "steps" or "epochs", key, style)])
FIGURES: dict[str, tuple[str, str, list[tuple[str, str, str, str]]]] = {
    "loss.png": (
        "Loss",
        "cross-entropy",
        [("train (per logged step)", "steps", "train/loss", "-"), ("validation", "epochs", "val/loss", "o-")],
    ),
    "accuracy.png": (
        "Top-1 accuracy",
        "accuracy",
        [("train (per logged step)", "steps", "train/acc", "-"), ("validation", "epochs", "val/acc", "o-")],
    ),
    "lr.png": ("Learning rate", "learning rate", [("lr", "steps", "lr", "-")]),
}


def plot_history(run_dir: Path) -> list[Path]:
    """Draw ``RUN_DIR/history/history.json`` into ``RUN_DIR/plots/`` (800 x 500 px PNGs); return the files written.

    ``loss.png`` (train/loss per logged step, val/loss per validation), ``accuracy.png`` (train/acc, val/acc) and
    ``lr.png``; x is the step (in a swarm, the swarm step). A figure none of whose series has data is not drawn.
    Raises FileNotFoundError / ValueError as ``load_history`` does."""
    history = load_history(run_dir)
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    out = Path(run_dir) / PLOTS_DIR
    written = []
    for name, (title, ylabel, lines) in FIGURES.items():
        series = [(label, *_series(history[part], key), style) for label, part, key, style in lines]
        series = [(label, steps, values, style) for label, steps, values, style in series if steps]
        if not series:
            continue
        out.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        try:
            for label, steps, values, style in series:
                ax.plot(steps, values, style, label=label, markersize=4)
            ax.set_title(f"{title}: {Path(run_dir).resolve().name}")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
        finally:
            plt.close(fig)
        written.append(out / name)
    return written
