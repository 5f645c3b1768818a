"""What a training user expects from ``vitpeer train`` and ``join`` beyond the loop: schedules, refusals before any
work starts, gradient accumulation, early stopping, best/last checkpoints, results and config files, TensorBoard,
and ``vitpeer evaluate`` on what a run wrote."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vitpeer.peer.core.config import load_config
from vitpeer.peer.core.model import Schedule


def vitpeer(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vitpeer.peer.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_schedules_are_functions_of_the_step():
    cosine = Schedule("cosine", warmup_steps=4, total_steps=20, min_ratio=0.1)
    assert [round(cosine(step), 3) for step in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert cosine(4) == pytest.approx(1.0) and cosine(20) == pytest.approx(0.1) and cosine(12) == pytest.approx(0.55)
    assert Schedule("constant", 2, 20)(1) == pytest.approx(2 / 3) and Schedule("constant", 2, 20)(19) == 1.0
    # OneCycle: torch's defaults, lr/25 -> lr over the first 30 % -> lr/2.5e5, a cosine each way
    onecycle = Schedule("onecycle", 0, 100)
    values = [onecycle(step) for step in range(101)]
    assert (
        values[0] == pytest.approx(1 / 25) and values[30] == pytest.approx(1.0) and values[100] == pytest.approx(4e-6)
    )
    assert all(a < b for a, b in zip(values[:30], values[1:31], strict=True))
    assert all(a > b for a, b in zip(values[30:100], values[31:], strict=True))


@pytest.mark.parametrize(
    "args, says",
    [
        (
            ["train", "--precision", "16-mixed", "--accelerator", "cpu"],
            "'16-mixed' (fp16 autocast with loss scaling) needs a CUDA GPU",
        ),
        (["join", "--precision", "16-mixed"], "'16-mixed' is not supported in a swarm"),
        (["join", "--accumulate-grad-batches", "4"], "raise that instead and leave accumulate_grad_batches at 1"),
        (["train", "--accelerator", "gpu"], "torch sees no CUDA GPU"),
        (["train", "--schedule", "linear"], "Invalid value for '--schedule'"),
    ],
)
def test_impossible_combinations_stop_before_training_with_one_line(tmp_path: Path, args: list[str], says: str):
    if ("gpu" in args or args[:2] == ["train", "--precision"]) and torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    done = vitpeer(*args, "--output-dir", str(tmp_path / "run"), "--max-steps", "1")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]  # click adds usage to a flag's
    assert len(errors) == 1 and says in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_join_refuses_early_stopping_from_a_config_file(tmp_path: Path):
    config = tmp_path / "stop.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"early_stopping_patience": 2}}))
    done = vitpeer("join", "--config", str(config), "--output-dir", str(tmp_path / "run"))
    assert done.returncode != 0 and "one peer cannot stop the run early" in done.stderr


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """digits_tiny with a constant learning rate too high for it (0.03): validation loss soon stops improving, so
    early stopping (patience 1) ends the run long before max_steps (at step 80 of 400 here); 2 local steps per
    optimizer step."""
    out = tmp_path_factory.mktemp("stopped")
    config = out / "config-in.yaml"
    overrides = {"optim.lr": 0.03, "optim.warmup_steps": 0, "optim.schedule": "constant"}
    load_config("digits_tiny", overrides).save(config)
    done = vitpeer(
        "train", "--config", str(config), "--output-dir", str(out), "--max-steps", "400",
        "--accumulate-grad-batches", "2", "--early-stopping-patience", "1", "--save-top-k", "2",
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_early_stopping_accumulation_best_checkpoints_and_run_files(stopped_run: Path):
    results = json.loads((stopped_run / "all_results.json").read_text())
    for key in ("train_loss", "train_runtime", "train_samples_per_second", "eval_loss", "eval_accuracy", "epoch"):
        assert isinstance(results[key], int | float) and math.isfinite(results[key]), (key, results[key])
    assert results["stopped_early"] and results["global_step"] < 400

    # 2 local batches of 32 per optimizer step; an epoch's odd last batch steps on its own
    batches = results["train_samples"] // 32
    assert 2 * results["global_step"] - batches <= math.ceil(results["epoch"])

    epochs = json.loads((stopped_run / "history" / "history.json").read_text())["epochs"]
    losses = [record["val/loss"] for record in epochs]
    assert len(losses) >= 2 and losses[-1] >= min(losses[:-1])  # it stopped because the last did not improve

    best = sorted(path.name for path in (stopped_run / "checkpoints").glob("best-*.ckpt"))
    assert 1 <= len(best) <= 2 and (stopped_run / "checkpoints" / "last.ckpt").is_file()
    assert (
        results["evaluated_checkpoint"]
        == f"checkpoints/{min(best, key=lambda name: float(name.split('loss=')[1][:-5]))}"
    )
    assert min(losses) == pytest.approx(results["eval_loss"], rel=1e-4)  # the best one was evaluated

    saved = json.loads((stopped_run / "config.json").read_text())
    assert saved["trainer"]["accumulate_grad_batches"] == 2 and saved["optim"]["lr"] == 0.03
    assert load_config(stopped_run / "config.yaml").model_dump(mode="json") == saved
    assert list((stopped_run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluate_reproduces_the_runs_test_numbers_and_reports_every_class(stopped_run: Path):
    results = json.loads((stopped_run / "all_results.json").read_text())
    done = vitpeer("evaluate", str(stopped_run / results["evaluated_checkpoint"]), "--json")
    assert done.returncode == 0, done.stderr
    evaluated = json.loads(done.stdout)
    assert evaluated["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)
    assert evaluated["loss"] == pytest.approx(results["test_loss"], rel=1e-4)
    assert evaluated["samples"] == 270  # digits: 15 % of 1,797 held out for the test
    rows = [line.split()[0] for line in evaluated["report"].splitlines()[2:12]]
    assert rows == [str(digit) for digit in range(10)]

    exported = vitpeer("evaluate", str(stopped_run / "model.safetensors"), "--split", "test")
    assert exported.returncode == 0 and f"accuracy {results['test_accuracy']:.4f}" in exported.stdout


def test_evaluate_refuses_a_corrupt_checkpoint_in_one_line(tmp_path: Path):
    (tmp_path / "config.yaml").write_text(load_config().to_yaml())
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    done = vitpeer("evaluate", str(tmp_path / "broken.ckpt"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1 and "is not a readable checkpoint" in lines[0], done.stderr


LOG_A_FAILED_ROUND = """
import logging
from vitpeer.peer.core.config.options import setup_logging
setup_logging(verbose=False)
try:
    raise TimeoutError("averaging round 7 timed out")
except TimeoutError as err:
    logging.getLogger("hivemind.averaging.averager").exception(err)
"""


def test_a_library_error_is_one_line():
    """hivemind logs each failed averaging round with its traceback (training goes on): a volunteer sees one line
    (``--verbose`` keeps the traceback)."""
    done = subprocess.run([sys.executable, "-c", LOG_A_FAILED_ROUND], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "round 7" in line]
    assert len(said) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "[ERROR] [hivemind.averaging.averager" in said[0] and "TimeoutError: averaging round 7" in said[0], said
