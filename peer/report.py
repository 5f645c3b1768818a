"""Each peer's metrics record in the DHT: its schema, the validators that protect it, the callback that publishes it.

Every swarm step a peer stores one ``PeerReport`` under the key ``<run_id>_metrics``, with its RSA public key as the
subkey. Two validators run on every DHT node that stores or fetches a record:

- ``SignatureGuard`` (hivemind's RSA signature validator): a record whose subkey names a public key must be signed
  by that key's owner, so no peer can overwrite another's record;
- ``SchemaGuard`` (hivemind's pydantic schema validator): the subkey must carry a public key (unsigned records are
  refused) and the value must match ``PeerReport`` exactly.

Both count what they reject; ``rejected_records(dht)`` reads the counts from the DHT process. hivemind's own
progress tracker adds the same two validator types later, which merge into ours (hivemind keeps one of each).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import hivemind
import pytorch_lightning as pl
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from pydantic.v1 import BaseModel, confloat, conint, constr
from pytorch_lightning.utilities.data import extract_batch_size

from peer.fingerprint import FingerprintSchema

log = logging.getLogger(__name__)

REPORT_TTL = 60.0
"""Seconds a record stays in the DHT: a peer that stops reporting drops out of the coordinator's alive list."""
REPORT_EVERY = 15.0
"""Seconds between records when swarm steps are slower than that (so a slow peer never looks dead)."""


class PeerReport(BaseModel):
    """What one peer says about itself. Strict types: hivemind refuses records that would need conversions. Strings
    are bounded: an oversized record (a peer filling the DHT, or /status, with megabytes) is refused like a forged one.
    """

    peer_id: constr(strict=True, max_length=128)  # base58 libp2p peer id (about 52 characters), for /status readers
    step: conint(ge=0, strict=True)  # the swarm step (hivemind epoch) this peer is at
    loss: confloat(ge=0, strict=True) | None  # mean training loss per sample since the previous record
    window_samples: conint(ge=0, strict=True)  # samples that mean is over: the weight of this loss in the swarm loss
    samples_per_second: confloat(ge=0, strict=True)  # this peer's throughput (hivemind's moving average)
    samples: conint(ge=0, strict=True)  # samples this peer contributed since it started
    mini_steps: conint(ge=0, strict=True)  # local steps (forward + backward) since it started
    version: constr(strict=True, max_length=64)  # vitpeer version
    hardware: constr(strict=True, max_length=256)  # e.g. "cuda: NVIDIA H100 80GB HBM3 x1" or "cpu: 16 cores"
    time: confloat(strict=True)  # DHT time of the record


class MetricsSchema(BaseModel):
    metrics: dict[BytesWithPublicKey, PeerReport | None]


def metrics_key(run_id: str) -> str:
    return f"{run_id}_metrics"


class _Counting:
    """Mixin for a hivemind validator: count and log the records it refuses."""

    reason = ""
    rejected = 0

    def validate(self, record: DHTRecord) -> bool:
        try:
            if super().validate(record):
                return True
        except Exception:  # e.g. an [owner:...] that is no RSA key: hivemind raises instead of refusing
            pass
        self.rejected += 1
        log.warning("refused a DHT record: %s (%d so far)", self.__doc__.split(":")[0].lower(), self.rejected)
        return False


class SignatureGuard(_Counting, RSASignatureValidator):
    """Missing or wrong signature: hivemind's RSA check, counting the records it refuses (forged or tampered)."""

    reason = "signature"


class SchemaGuard(_Counting, SchemaValidator):
    """Unsigned or not matching its schema: hivemind's pydantic check on ``<run_id>_metrics`` and
    ``<run_id>_fingerprint``, counting refusals."""

    reason = "schema"

    def __init__(self, run_id: str):
        super().__init__(MetricsSchema, prefix=run_id)
        self.merge_with(SchemaValidator(FingerprintSchema, prefix=run_id))  # one guard, one count, both keys


def record_validators(run_id: str) -> list[RecordValidatorBase]:
    """The validators every vitpeer DHT node runs (pass as ``hivemind.DHT(record_validators=...)``)."""
    return [SchemaGuard(run_id), SignatureGuard()]


async def _count_rejections(_dht: hivemind.DHT, node) -> dict[str, int]:
    counts = {"signature": 0, "schema": 0}
    for validator in node.protocol.record_validator._validators:  # hivemind keeps no public accessor
        if isinstance(validator, SignatureGuard | SchemaGuard):
            counts[validator.reason] += validator.rejected
    return counts


def rejected_records(dht: hivemind.DHT) -> dict[str, int]:
    """Records this node refused so far, by reason (the validators run inside the DHT process)."""
    return dht.run_coroutine(_count_rejections)


def hardware_summary() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"cpu: {os.cpu_count()} cores ({platform.machine()})"


def vitpeer_version() -> str:
    try:
        return version("vitpeer")
    except PackageNotFoundError:
        return "unknown"


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

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        size = extract_batch_size(batch) * trainer.world_size  # with local DDP ranks, the peer's samples: all ranks'
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float("nan")
        self.samples += size
        self.mini_steps += 1
        if math.isfinite(loss):
            self.window_loss += loss * size
            self.window_samples += size
        opt = trainer.strategy.optimizer
        if opt.local_epoch != self.reported_step or time.monotonic() - self.reported_at > REPORT_EVERY:
            self.publish(opt.local_epoch, opt.local_progress.samples_per_second)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a goodbye: the record becomes None, so the coordinator stops listing this peer at once
        self.dht.store(self.key, subkey=self.subkey, value=None, expiration_time=get_dht_time() + REPORT_TTL)

    def publish(self, step: int, samples_per_second: float) -> None:
        report = self.report(step, samples_per_second)
        self.dht.store(
            self.key, subkey=self.subkey, value=report, expiration_time=get_dht_time() + REPORT_TTL, return_future=True
        )
        self.reported_step, self.reported_at, self.last = step, time.monotonic(), report
        self.window_loss, self.window_samples = 0.0, 0

    def report(self, step: int, samples_per_second: float) -> dict[str, Any]:
        loss = self.window_loss / self.window_samples if self.window_samples else None
        return PeerReport(
            peer_id=self.peer_id,
            step=step,
            loss=loss,
            window_samples=self.window_samples,
            samples_per_second=float(max(0.0, samples_per_second)),
            samples=self.samples,
            mini_steps=self.mini_steps,
            version=self.version,
            hardware=self.hardware,
            time=get_dht_time(),
        ).dict()
