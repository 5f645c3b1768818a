"""``SwarmReporter``: the Lightning callback that publishes this peer's ``core.swarm.records.PeerReport`` to the DHT.

Besides samples and loss, a report says what the swarm cost the peer (``swarm_costs``): its algorithm, its rounds,
the bytes it sent in them (an estimate, ``core.averaging.events.allreduce_bytes_sent``), how long they took, and the
training thread's time computing against its time blocked on the swarm. Compute is measured here, per local step:
the step's wall time (forward, backward, the optimizer step) minus the time it was blocked on the swarm inside it;
data loading and validation count as neither.

A report stays within ``core.swarm.records``' per-peer bounds, which every node enforces: a diverged loss is published
as ``MAX_LOSS``, and hivemind's throughput estimate (absurdly high after a near-zero interval) is capped at
``MAX_SAMPLES_PER_SECOND``.
"""

from __future__ import annotations

import math
import os
import platform
import time
from typing import Any, Protocol, cast

import hivemind
import pytorch_lightning as pl
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import get_dht_time
from pytorch_lightning.utilities.data import extract_batch_size

from vitpeer.peer.core.averaging.events import SwarmEvents, SwarmTotals
from vitpeer.peer.core.averaging.hivemind_averagers import store_farewell
from vitpeer.peer.core.config import SwarmConfig
from vitpeer.peer.core.swarm.records import (
    MAX_LOSS,
    MAX_SAMPLES_PER_SECOND,
    REPORT_TTL,
    PeerReport,
    metrics_key,
    vitpeer_version,
)

REPORT_EVERY = 15.0
"""Seconds between records when swarm steps are slower than that (so a slow peer never looks dead)."""


def hardware_summary() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"cpu: {os.cpu_count()} cores ({platform.machine()})"


class _SwarmOptimizer(Protocol):
    """What the reporter reads of the optimizer a swarm strategy steps (``SwarmOptimizer`` or ``DiLoCoOptimizer``)."""

    events: SwarmEvents

    @property
    def local_epoch(self) -> int: ...

    @property
    def local_progress(self) -> LocalTrainingProgress: ...


class _SwarmStrategy(Protocol):
    """What the reporter reads of the strategy it runs under: ``core.lightning.strategy.SwarmSteps``, a layer above
    this one, so named here by its shape rather than imported."""

    swarm: SwarmConfig

    @property
    def optimizer(self) -> _SwarmOptimizer: ...


def _swarm_strategy(trainer: pl.Trainer) -> _SwarmStrategy:
    return cast(_SwarmStrategy, trainer.strategy)  # join trains with the swarm strategy only


class SwarmReporter(pl.Callback):
    """Publishes this peer's ``PeerReport`` to the DHT once per swarm step (at most every ``REPORT_EVERY`` s apart).

    The store is signed and sent by the DHT process in the background (``return_future=True``): training never waits.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str):
        self.dht, self.key = dht, metrics_key(run_id)
        self.subkey = RSASignatureValidator().local_public_key  # this process's key: the one SignatureGuard signs with
        self.peer_id = dht.peer_id.to_base58()
        self.hardware, self.version = hardware_summary(), vitpeer_version()
        self.samples = self.mini_steps = 0
        self.window_loss, self.window_samples = 0.0, 0
        self.reported_step, self.reported_at = -1, 0.0
        self.last: dict[str, Any] | None = None  # the newest published report (the Prometheus exporter reads it)
        self.algorithm: str | None = None
        self.events = SwarmEvents()  # the swarm optimizer's, once training starts: its totals are what we publish
        self.compute_seconds = 0.0
        self._step_started, self._step_wait = 0.0, 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = _swarm_strategy(trainer)
        self.algorithm = strategy.swarm.algorithm
        self.events = strategy.optimizer.events

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        self._step_started, self._step_wait = time.perf_counter(), self.events.snapshot().wait_seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        blocked = self.events.snapshot().wait_seconds - self._step_wait  # reported inside the step, before its end
        self.compute_seconds += max(0.0, time.perf_counter() - self._step_started - blocked)
        size = extract_batch_size(batch) * trainer.world_size  # with local DDP ranks, the peer's samples: all ranks'
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float("nan")
        self.samples += size
        self.mini_steps += 1
        if math.isfinite(loss):
            self.window_loss += loss * size
            self.window_samples += size
        opt = _swarm_strategy(trainer).optimizer
        if opt.local_epoch != self.reported_step or time.monotonic() - self.reported_at > REPORT_EVERY:
            self.publish(opt.local_epoch, opt.local_progress.samples_per_second)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a goodbye: the record becomes None, so the coordinator stops listing this peer at once
        store_farewell(self.dht, self.key, self.subkey, get_dht_time() + REPORT_TTL, "metrics")

    def publish(self, step: int, samples_per_second: float) -> None:
        report = self.report(step, samples_per_second)
        self.dht.store(
            self.key, subkey=self.subkey, value=report, expiration_time=get_dht_time() + REPORT_TTL, return_future=True
        )
        self.reported_step, self.reported_at, self.last = step, time.monotonic(), report
        self.window_loss, self.window_samples = 0.0, 0

    def swarm_costs(self) -> dict[str, Any]:
        """The ``PeerReport`` fields that say what the swarm cost this peer so far (see
        ``core.averaging.events.SwarmTotals``)."""
        totals: SwarmTotals = self.events.snapshot()
        return {
            "algorithm": self.algorithm,
            "rounds": totals.rounds,
            "averaged_rounds": totals.averaged_rounds,
            "failed_rounds": totals.failed_rounds,
            "sent_bytes": int(totals.sent_bytes),
            "averaging_seconds": float(totals.averaging_seconds),
            "wait_seconds": float(totals.wait_seconds),
            "compute_seconds": float(self.compute_seconds),
        }

    def report(self, step: int, samples_per_second: float) -> dict[str, Any]:
        loss = min(self.window_loss / self.window_samples, MAX_LOSS) if self.window_samples else None
        if loss is not None and not math.isfinite(loss):  # finite losses whose sum overflowed
            loss = MAX_LOSS
        speed = samples_per_second if math.isfinite(samples_per_second) else MAX_SAMPLES_PER_SECOND
        return PeerReport(
            peer_id=self.peer_id,
            step=step,
            loss=loss,
            window_samples=self.window_samples,
            samples_per_second=float(min(max(0.0, speed), MAX_SAMPLES_PER_SECOND)),
            samples=self.samples,
            mini_steps=self.mini_steps,
            version=self.version,
            hardware=self.hardware,
            time=get_dht_time(),
            **self.swarm_costs(),
        ).dict()
