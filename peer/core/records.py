"""The records vitpeer keeps in the DHT, their schemas, and the validators that protect them.

Every swarm step a peer stores one ``PeerReport`` under the key ``<run_id>_metrics`` (``core.reporter`` publishes it),
and every peer keeps its ``RunFingerprint`` under ``<run_id>_fingerprint`` (``core.fingerprint``), each with its RSA
public key as the subkey. Two validators run on every DHT node that stores or fetches a record:

- ``SignatureGuard`` (hivemind's RSA signature validator): a record whose subkey names a public key must be signed
  by that key's owner, so no peer can overwrite another's record;
- ``SchemaGuard`` (hivemind's pydantic schema validator): the subkey must carry a public key (unsigned records are
  refused) and the value must match ``PeerReport`` or ``RunFingerprint`` exactly.

Both count what they reject; ``rejected_records(dht)`` reads the counts from the DHT process. hivemind's own
progress tracker adds the same two validator types later, which merge into ours (hivemind keeps one of each).
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from pydantic.v1 import BaseModel, ValidationError, confloat, conint, constr

from vitpeer.peer.core.hivemind_adapters import dht_node_validators

log = logging.getLogger(__name__)

# No Lightning and no timm here (hivemind brings torch): ``vitpeer doctor`` loads this through ``core.swarm``.

REPORT_TTL = 60.0
"""Seconds a record stays in the DHT: a peer that stops reporting drops out of the coordinator's alive list."""


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
    # What the swarm cost this peer since it started (``core.events.SwarmTotals``, ``SwarmReporter.swarm_costs``).
    # The defaults only spare callers that leave them out; they buy no compatibility: hivemind's schema check refuses
    # a record that does not parse into exactly itself, so nodes of this version refuse records without these
    # fields (from older peers), and older nodes refuse records with them.
    algorithm: constr(strict=True, max_length=32) | None = None  # swarm.algorithm: "diloco" or "gradient"
    rounds: conint(ge=0, strict=True) = 0  # swarm steps ended with a round, any outcome
    averaged_rounds: conint(ge=0, strict=True) = 0  # rounds that averaged with other peers
    failed_rounds: conint(ge=0, strict=True) = 0  # rounds that ended in an error or a timeout
    sent_bytes: conint(ge=0, strict=True) = 0  # estimated bytes sent in averaged rounds: 2 (N - 1) / N of its tensors
    averaging_seconds: confloat(ge=0, strict=True) = 0.0  # total duration of the averaged rounds
    wait_seconds: confloat(ge=0, strict=True) = 0.0  # the training thread blocked on the swarm
    compute_seconds: confloat(ge=0, strict=True) = 0.0  # local steps' time, less the time blocked inside them


class RunFingerprint(BaseModel):
    """What a peer trains, as published. ``digest`` decides; the rest is for the message a mismatch prints."""

    digest: constr(strict=True, min_length=16, max_length=64)
    model: constr(strict=True, max_length=200)
    parameters: conint(strict=True, ge=0)
    img_size: conint(strict=True, gt=0)
    classes: conint(strict=True, gt=0)
    wire_format: conint(strict=True, ge=0)
    hyperparameters: constr(strict=True, max_length=2000) = "{}"
    """The run-level settings every peer must share (``core.fingerprint.RUN_SETTINGS``), as sorted JSON."""

    def describe(self) -> str:
        return (
            f"{self.model} ({self.parameters:,} parameters) at {self.img_size} px for {self.classes} classes, "
            f"wire format {self.wire_format} (fingerprint {self.digest})"
        )


class FingerprintSchema(BaseModel):
    fingerprint: dict[BytesWithPublicKey, RunFingerprint | None]


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
    for validator in dht_node_validators(node):
        if isinstance(validator, SignatureGuard | SchemaGuard):
            counts[validator.reason] += validator.rejected
    return counts


def rejected_records(dht: hivemind.DHT) -> dict[str, int]:
    """Records this node refused so far, by reason (the validators run inside the DHT process)."""
    return dht.run_coroutine(_count_rejections)


def vitpeer_version() -> str:
    try:
        return version("vitpeer")
    except PackageNotFoundError:
        return "unknown"


# Reading the records back: who is alive, the swarm's loss and throughput, and their history (coordinator, monitor).


def read_reports(dht: hivemind.DHT, run_id: str) -> list[PeerReport]:
    """The alive peers' newest reports (records expire on their own), one per peer id."""
    found = dht.get(metrics_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    newest: dict[str, PeerReport] = {}
    for item in found.value.values():
        if item.value is None:  # a peer's goodbye
            continue
        try:
            report = PeerReport.parse_obj(item.value)
        except (ValidationError, TypeError) as err:  # the DHT validators let none through; stay safe anyway
            log.warning("ignoring a malformed metrics record: %s", err)
            continue
        if report.peer_id not in newest or report.time > newest[report.peer_id].time:
            newest[report.peer_id] = report  # a restarted peer signs with a new key: keep its newest record
    return sorted(newest.values(), key=lambda report: report.peer_id)


def aggregate(reports: list[PeerReport]) -> dict[str, Any]:
    """Swarm step, sample-weighted loss, total samples/s, the algorithm, what the swarm cost the peers
    (``communication``) and each alive peer's last report with its own costs per round."""
    now = get_dht_time()
    weighted = [(r.loss, r.window_samples) for r in reports if r.loss is not None and r.window_samples > 0]
    samples = sum(n for _, n in weighted)
    algorithms = sorted({r.algorithm for r in reports if r.algorithm is not None})
    return {
        "swarm_epoch": max((r.step for r in reports), default=None),
        "loss": sum(loss * n for loss, n in weighted) / samples if samples else None,
        "samples_per_second": sum(r.samples_per_second for r in reports),
        "alive_peers": len(reports),
        # one run has one algorithm (it is part of the run's fingerprint); "mixed" would mean records of two runs
        "algorithm": algorithms[0] if len(algorithms) == 1 else ("mixed" if algorithms else None),
        "communication": communication(reports),
        "peers": [{**r.dict(), **per_round(r.dict()), "seconds_since_report": round(now - r.time, 1)} for r in reports],
    }


COST_FIELDS = (
    "rounds",
    "averaged_rounds",
    "failed_rounds",
    "sent_bytes",
    "averaging_seconds",
    "wait_seconds",
    "compute_seconds",
)


def per_round(costs: dict[str, Any]) -> dict[str, float | None]:
    """What an operator compares, from ``COST_FIELDS`` totals (one peer's, or the swarm's sums): estimated bytes sent
    and seconds averaging per averaged round, seconds computing per round, and the share of time blocked on the swarm
    (None until there is something to divide by)."""
    averaged, rounds = costs["averaged_rounds"], costs["rounds"]
    busy = costs["wait_seconds"] + costs["compute_seconds"]
    return {
        "sent_bytes_per_round": costs["sent_bytes"] / averaged if averaged else None,
        "averaging_seconds_per_round": costs["averaging_seconds"] / averaged if averaged else None,
        "compute_seconds_per_round": costs["compute_seconds"] / rounds if rounds else None,
        "wait_ratio": costs["wait_seconds"] / busy if busy > 0 else None,
    }


def communication(reports: list[PeerReport]) -> dict[str, Any]:
    """The alive peers' costs summed since each started, and the same per-round figures as each peer's."""
    sums = {key: sum(getattr(r, key) for r in reports) for key in COST_FIELDS}
    return {**sums, **per_round(sums)}


class MetricsLog:
    """``metrics.jsonl``: one line per swarm step the coordinator saw, appended (survives restarts)."""

    def __init__(self, path: Path):
        self.path, self.last_epoch = path, None

    def append(self, swarm: dict[str, Any]) -> bool:
        if swarm["swarm_epoch"] is None or swarm["swarm_epoch"] == self.last_epoch:
            return False
        self.last_epoch = swarm["swarm_epoch"]
        line = {key: swarm[key] for key in ("swarm_epoch", "loss", "samples_per_second", "alive_peers")}
        line["time"] = round(get_dht_time(), 3)
        line["peer_steps"] = {peer["peer_id"]: peer["step"] for peer in swarm["peers"]}
        with self.path.open("a") as sink:
            sink.write(json.dumps(line) + "\n")
        return True
