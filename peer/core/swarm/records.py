"""The records vitpeer keeps in the DHT, their schemas, and the validators that protect them.

Every swarm step a peer stores one ``PeerReport`` under the key ``<run_id>_metrics`` (``core.swarm.reporter``
publishes it),
and every peer keeps its ``RunFingerprint`` under ``<run_id>_fingerprint`` (``core.swarm.fingerprint``), each with its
RSA public key as the subkey. Two validators run on every DHT node that stores or fetches a record:

- ``SignatureGuard`` (hivemind's RSA signature validator): a record whose subkey names a public key must be signed
  by that key's owner, so no peer can overwrite another's record;
- ``SchemaGuard`` (hivemind's pydantic schema validator): the subkey must carry a public key (unsigned records are
  refused) and the value must match ``PeerReport`` or ``RunFingerprint`` exactly; a ``PeerReport`` must also be
  plausible: finite numbers within the per-peer bounds below, counts that agree, a time near now (``out_of_bounds``).

Both count what they reject; ``rejected_records(dht)`` reads the counts from the DHT process. hivemind's own
progress tracker adds the same two validator types later, which merge into ours (hivemind keeps one of each).

A record's identity is the key that signed it, never the ``peer_id`` written inside it: that one is self-declared
(nothing checks it against the signing key), so readers (``read_reports``) keep one row per signer, named by
``signer_id``, and show ``peer_id`` as a label only. Two keys that claim the same ``peer_id`` are two rows. A vitpeer
node started with an identity file signs with its identity's key (``core.swarm.dht.start_dht``), so an honest peer's
signer is its peer id, the same after a restart; a node without one signs with a key hivemind makes anew in each
process. Readers repeat every check themselves: a record may come from a node that did not run these validators.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import hivemind
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator, conbytes
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer, ValueWithExpiration, get_dht_time
from pydantic.v1 import BaseModel, Field, StrictStr, ValidationError, confloat, conint, root_validator

from vitpeer.peer.core.averaging.hivemind_averagers import dht_node_validators
from vitpeer.peer.core.averaging.remote_state import plausible_limit

log = logging.getLogger(__name__)

# No Lightning and no timm here (hivemind brings torch): ``vitpeer doctor`` loads this through ``core.swarm.dht``.

REPORT_TTL = 60.0
"""Seconds a record stays in the DHT: a peer that stops reporting drops out of the coordinator's alive list."""


# What one peer can claim. Generous: a record beyond them cannot be true, so every node refuses it and every reader
# skips it; within them a peer can still lie, but its weight in the swarm's figures stays bounded.

MAX_SAMPLES_PER_SECOND = 10_000_000.0
"""Samples per second one peer can train: far above what a node of today's GPUs can train a ViT-B at, and above what
a tiny model's data loader feeds (README, Performance, "Figures behind choices in the code", has the arithmetic). It
also caps hivemind's throughput estimate, which can jump after a near-zero interval
(``hivemind.utils.performance_ema``): the reporter clamps to it."""

MAX_WINDOW_SAMPLES = int(MAX_SAMPLES_PER_SECOND * REPORT_TTL)
"""Samples one record's loss can be over (its weight in the swarm loss): a peer publishes every swarm step or
``REPORT_EVERY`` s, and one silent longer than ``REPORT_TTL`` has already dropped out, so a window is at most
``REPORT_TTL`` s of training at the maximal rate."""

MAX_LOSS = 1e4
"""Mean training loss per sample. Cross-entropy starts near ln(classes) (6.9 for 1,000 classes, 10 for 21,841);
above this the peer has diverged and the reporter publishes this value. The bound keeps the swarm loss (sum of loss x
window) finite, far from float overflow."""

MAX_TOTAL = 2**53
"""Cumulative counts and seconds since a peer started (samples, steps, rounds, bytes, seconds): exact in JSON and as
a float. Finite is the point; no peer gets near it."""

MAX_CLOCK_AHEAD = 10.0
"""Seconds a record's time may be ahead of the reader's DHT time (wall clocks; NTP keeps them within a second). A
peer whose clock runs further ahead is refused until it fixes its clock."""

RECORD_SLACK = 5.0
"""Seconds between a report's time and the moment the reporter computes its expiration (``time + REPORT_TTL``)."""

# The numbers' types. hivemind's SchemaValidator checks pydantic v1 models, and pydantic v1 bounds a strict number only
# with a call (``conint``, ``confloat``), which no type annotation may hold: checkers see the plain type, as they do
# pydantic's own ``StrictInt``. (A string's bounds fit its annotation: ``Annotated[StrictStr, Field(max_length=...)]``.)
if TYPE_CHECKING:
    Total = WindowSamples = NonNegative = Positive = int
    Loss = SamplesPerSecond = DhtTime = TotalSeconds = float
else:
    Total = conint(ge=0, le=MAX_TOTAL, strict=True)  # a count since a peer started
    WindowSamples = conint(ge=0, le=MAX_WINDOW_SAMPLES, strict=True)
    NonNegative = conint(strict=True, ge=0)
    Positive = conint(strict=True, gt=0)
    Loss = confloat(ge=0, le=MAX_LOSS, strict=True, allow_inf_nan=False)
    SamplesPerSecond = confloat(ge=0, le=MAX_SAMPLES_PER_SECOND, strict=True, allow_inf_nan=False)
    DhtTime = confloat(ge=0, strict=True, allow_inf_nan=False)
    TotalSeconds = confloat(ge=0, le=MAX_TOTAL, strict=True, allow_inf_nan=False)  # seconds since a peer started


class PeerReport(BaseModel):
    """What one peer says about itself. Strict types: hivemind refuses records that would need conversions. Strings
    are bounded: an oversized record (a peer filling the DHT, or /status, with megabytes) is refused like a forged one.
    Numbers are finite and within the per-peer bounds above, and the counts agree with each other.
    """

    # base58 libp2p peer id (about 52 characters) as the peer declares it: a label for /status readers, not an
    # identity (rows are keyed by the signing key, ``signer_id``)
    peer_id: Annotated[StrictStr, Field(max_length=128)]
    step: Total  # the swarm step (hivemind epoch) this peer is at
    # mean training loss per sample since the previous record
    loss: Loss | None
    # samples that mean is over: the weight of this loss in the swarm loss
    window_samples: WindowSamples
    # this peer's throughput (hivemind's moving average)
    samples_per_second: SamplesPerSecond
    samples: Total  # samples this peer contributed since it started
    mini_steps: Total  # local steps (forward + backward) since it started
    version: Annotated[StrictStr, Field(max_length=64)]  # vitpeer version
    hardware: Annotated[StrictStr, Field(max_length=256)]  # e.g. "cuda: NVIDIA H100 80GB HBM3 x1" or "cpu: 16 cores"
    time: DhtTime  # DHT time of the record (checked: ``out_of_bounds``)
    # What the swarm cost this peer since it started (``core.averaging.events.SwarmTotals``,
    # ``SwarmReporter.swarm_costs``).
    # The defaults only spare callers that leave them out; they buy no compatibility: hivemind's schema check refuses
    # a record that does not parse into exactly itself, so nodes of this version refuse records without these
    # fields (from older peers), and older nodes refuse records with them.
    algorithm: Annotated[StrictStr | None, Field(max_length=32)] = None  # swarm.algorithm: "diloco" or "gradient"
    rounds: Total = 0  # swarm steps ended with a round, any outcome
    averaged_rounds: Total = 0  # rounds that averaged with other peers
    failed_rounds: Total = 0  # rounds that ended in an error or a timeout
    # estimated bytes sent in averaged rounds: 2 (N - 1) / N of its tensors
    sent_bytes: Total = 0
    # total duration of the averaged rounds
    averaging_seconds: TotalSeconds = 0.0
    # the training thread blocked on the swarm
    wait_seconds: TotalSeconds = 0.0
    # local steps' time, less the time blocked inside them
    compute_seconds: TotalSeconds = 0.0

    @root_validator(skip_on_failure=True)
    def counts_agree(cls, values: dict[str, Any]) -> dict[str, Any]:
        """A window is part of the samples, each local step trains at least one sample, and averaged and failed
        rounds are among the rounds."""
        if values["window_samples"] > values["samples"]:
            raise ValueError(f"window_samples {values['window_samples']} > samples {values['samples']}")
        if values["mini_steps"] > values["samples"]:
            raise ValueError(f"mini_steps {values['mini_steps']} > samples {values['samples']}")
        if values["averaged_rounds"] + values["failed_rounds"] > values["rounds"]:
            raise ValueError("averaged_rounds + failed_rounds > rounds")
        return values


class SignedReport(PeerReport):
    """A ``PeerReport`` as a reader holds it: with ``signer``, the id of the key that signed it (``signer_id``)."""

    signer: str


def out_of_bounds(report: PeerReport, expiration_time: float, now: float) -> str | None:
    """Why a schema-valid record cannot be true at DHT time ``now`` given its ``expiration_time``, or None: its time
    is in the future, or its expiration is not the reporter's ``time + REPORT_TTL`` (a far-future expiration would
    keep a record alive for ever; a far-past time with a near expiration would hide a dead peer's age). Not whether
    it expired: a node refuses a whole dictionary for one bad entry, so nodes leave expiry to the clock of each."""
    if report.time > now + MAX_CLOCK_AHEAD:
        return f"its time is {report.time - now:.0f} s ahead of this node's (at most {MAX_CLOCK_AHEAD:.0f})"
    if not report.time <= expiration_time <= report.time + REPORT_TTL + RECORD_SLACK:
        return f"it expires {expiration_time - report.time:.0f} s after its time (at most {REPORT_TTL:.0f})"
    return None


_OWNER = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)

# A metrics record's subkey (``SignerKey``): exactly one RSA key, as ``RSASignatureValidator.local_public_key`` writes
# it. hivemind's ``BytesWithPublicKey`` (``OwnerKey``, a fingerprint's subkey) lets bytes surround it, so one key could
# sign many subkeys, and be many rows. Both are pydantic v1 types made by a call (hivemind's ``conbytes``), as above.
if TYPE_CHECKING:
    SignerKey = OwnerKey = bytes
else:
    SignerKey = conbytes(regex=rb"\[owner:ssh-rsa [A-Za-z0-9+/]+={0,2}\]\Z")
    OwnerKey = BytesWithPublicKey


@functools.lru_cache(maxsize=4096)
def signer_id(subkey: bytes) -> str:
    """The libp2p peer id of the RSA key a subkey names (``[owner:ssh-rsa ...]``): the base58 sha2-256 multihash of
    the key as libp2p's ``PublicKey`` protobuf, the derivation hivemind's ``PeerID.from_identity`` applies to a private
    key. So a peer that signs with its libp2p identity key (a vitpeer node started with an identity file) has its
    peer id as its signer id. It is the row's identity, whatever the record claims. ValueError if there is not one
    RSA key."""
    keys = set(_OWNER.findall(subkey))
    if len(keys) != 1:
        raise ValueError(f"a record's subkey must name one public key, not {len(keys)}")
    key = serialization.load_ssh_public_key(keys.pop())
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("a record's subkey must name an RSA key")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    protobuf = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()  # pyright: ignore[reportAttributeAccessIssue]  # hivemind's generated protobuf modules have no types
    sha2_256 = bytes([0x12, 0x20])  # multihash: function code, digest length
    return PeerID(sha2_256 + hashlib.sha256(protobuf).digest()).to_base58()


class RunFingerprint(BaseModel):
    """What a peer trains, as published. ``digest`` decides; the rest is for the message a mismatch prints."""

    digest: Annotated[StrictStr, Field(min_length=16, max_length=64)]
    model: Annotated[StrictStr, Field(max_length=200)]
    parameters: NonNegative
    img_size: Positive
    classes: Positive
    wire_format: NonNegative
    hyperparameters: Annotated[StrictStr, Field(max_length=2000)] = "{}"
    """The run-level settings every peer must share (``core.swarm.fingerprint.RUN_SETTINGS``), as sorted JSON."""

    def describe(self) -> str:
        return (
            f"{self.model} ({self.parameters:,} parameters) at {self.img_size} px for {self.classes} classes, "
            f"wire format {self.wire_format} (fingerprint {self.digest})"
        )


class FingerprintSchema(BaseModel):
    fingerprint: dict[OwnerKey, RunFingerprint | None]


class MetricsSchema(BaseModel):
    metrics: dict[SignerKey, PeerReport | None]


def metrics_key(run_id: str) -> str:
    return f"{run_id}_metrics"


class _Counting(RecordValidatorBase if TYPE_CHECKING else object):
    """Mixin for a hivemind validator: count and log the records it refuses. (Checkers see it on hivemind's base of
    validators, whose ``validate`` it extends; at run time the validator it is mixed into comes next in the MRO.)"""

    reason = ""
    rejected = 0

    def validate(self, record: DHTRecord) -> bool:
        try:
            if self.accepts(record):
                return True
        except Exception:  # e.g. an [owner:...] that is no RSA key: hivemind raises instead of refusing
            pass
        self.rejected += 1
        what = (self.__doc__ or self.reason).split(":")[0].lower()  # a guard's docstring begins with what it refuses
        log.warning("refused a DHT record: %s (%d so far)", what, self.rejected)
        return False

    def accepts(self, record: DHTRecord) -> bool:
        return super().validate(record)


class SignatureGuard(_Counting, RSASignatureValidator):
    """Missing or wrong signature: hivemind's RSA check, counting the records it refuses (forged or tampered)."""

    reason = "signature"


class SchemaGuard(_Counting, SchemaValidator):
    """Unsigned, not matching its schema or out of bounds: hivemind's pydantic check on ``<run_id>_metrics`` and
    ``<run_id>_fingerprint``, then ``out_of_bounds`` on a metrics record, counting refusals."""

    reason = "schema"

    def __init__(self, run_id: str):
        super().__init__(MetricsSchema, prefix=run_id)
        self.merge_with(SchemaValidator(FingerprintSchema, prefix=run_id))  # one guard, one count, both keys
        self.metrics_key_id = DHTID.generate(source=metrics_key(run_id)).to_bytes()

    def accepts(self, record: DHTRecord) -> bool:
        if not super().accepts(record):
            return False
        if record.key != self.metrics_key_id:
            return True
        value = MSGPackSerializer.loads(record.value)  # the signature is stripped by now: it is checked first
        if value is None:  # a peer's goodbye
            return True
        problem = out_of_bounds(PeerReport.parse_obj(value), record.expiration_time, get_dht_time())
        if problem is not None:
            log.warning("refused a metrics record: %s", problem)
        return problem is None


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
    return dht.run_coroutine(_count_rejections)  # pyright: ignore[reportReturnType]  # hivemind's type is value-or-future; a future only with return_future=True


def vitpeer_version() -> str:
    try:
        return version("vitpeer")
    except PackageNotFoundError:
        return "unknown"


# Reading the records back: who is alive, the swarm's loss and throughput, and their history (coordinator, monitor).


def read_reports(dht: hivemind.DHT, run_id: str) -> list[SignedReport]:
    """The alive peers' newest reports (records expire on their own), one per signing key, sorted by the peer id they
    claim, then time. Every check of the validators is repeated: a node of another version, or one that runs no
    validators, may have handed the record on."""
    found: ValueWithExpiration[Any] | None = dht.get(metrics_key(run_id), latest=True)  # pyright: ignore[reportAssignmentType]  # hivemind's type is value-or-future; a future only with return_future=True
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    newest: dict[str, SignedReport] = {}
    for subkey, item in found.value.items():
        if item.value is None:  # a peer's goodbye
            continue
        try:
            report = SignedReport(**PeerReport.parse_obj(item.value).dict(), signer=signer_id(subkey))
        except (ValidationError, TypeError, ValueError) as err:  # the DHT validators let none through; stay safe
            log.warning("ignoring a malformed metrics record: %s", err)
            continue
        problem = out_of_bounds(report, item.expiration_time, now)
        if problem is None and item.expiration_time <= now:
            problem = "it expired"  # by this reader's clock
        if problem is not None:
            log.warning("ignoring a metrics record of signer %s: %s", report.signer, problem)
            continue
        if report.signer not in newest or report.time > newest[report.signer].time:
            # a peer restarted with its identity file signs with the same key, so its new record replaced the old
            # one; a node without one signs with a new key per process: a new row until its old record expires
            newest[report.signer] = report
    return sorted(newest.values(), key=lambda report: (report.peer_id, report.time))


def aggregate(reports: Sequence[PeerReport], max_steps: int | None = None) -> dict[str, Any]:
    """Swarm step, sample-weighted loss, total samples/s, the algorithm, what the swarm cost the peers
    (``communication``) and each alive peer's last report with its own costs per round. ``reports`` are one per
    signer (``read_reports``): rows carry ``signer``, None for a report that was never signed (tests).

    The swarm step is the newest step a report claims within ``plausible_limit`` of all of them (one past the step
    most agree on, never past ``max_steps``): one record claiming step 2**53 had the coordinator checkpoint and
    evaluate at every poll."""
    now = get_dht_time()
    steps = [r.step for r in reports]
    limit = plausible_limit(steps, max_steps) if steps else 0
    weighted = [(r.loss, r.window_samples) for r in reports if r.loss is not None and r.window_samples > 0]
    samples = sum(n for _, n in weighted)
    algorithms = sorted({r.algorithm for r in reports if r.algorithm is not None})
    return {
        "swarm_epoch": max((step for step in steps if step <= limit), default=None),
        "loss": sum(loss * n for loss, n in weighted) / samples if samples else None,
        "samples_per_second": sum(r.samples_per_second for r in reports),
        "alive_peers": len(reports),
        # one run has one algorithm (it is part of the run's fingerprint); "mixed" would mean records of two runs
        "algorithm": algorithms[0] if len(algorithms) == 1 else ("mixed" if algorithms else None),
        "communication": communication(reports),
        "peers": [
            {"signer": None, **r.dict(), **per_round(r.dict()), "seconds_since_report": round(now - r.time, 1)}
            for r in reports
        ],
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


def communication(reports: Sequence[PeerReport]) -> dict[str, Any]:
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
        line["peer_steps"] = {peer["signer"] or peer["peer_id"]: peer["step"] for peer in swarm["peers"]}
        with self.path.open("a") as sink:
            sink.write(json.dumps(line) + "\n")
        return True
