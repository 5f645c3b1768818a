"""What must match across a run, hashed and published, so a peer that does not match is refused before it averages.

Peers of one run average tensors position by position. A peer whose network differs (another model, image size or
number of classes) or that speaks another vitpeer wire format would make every round it joins fail, or worse,
average unrelated numbers into the swarm's weights. So every peer and the coordinator publish a ``RunFingerprint``
under ``<run_id>_fingerprint`` (signed by their RSA key, schema-checked on every DHT node, refreshed while they run),
and a newcomer reads them before its first round: if any live record differs from its own, it stops with a line
that says what the run trains and what this peer has. It publishes nothing then, so it disturbs no one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter
from typing import Any

import hivemind
import pytorch_lightning as pl
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import ValueWithExpiration, get_dht_time

from vitpeer.peer.core.averaging.hivemind_averagers import store_farewell
from vitpeer.peer.core.config import ConfigError, RunConfig
from vitpeer.peer.core.model import image_config
from vitpeer.peer.core.swarm.records import RunFingerprint

log = logging.getLogger(__name__)

WIRE_FORMAT = 2
"""Bump when what peers exchange changes shape or meaning (tensor order, extra tensors, state layout, codecs).
2: 8-bit tensors are vitpeer's blockwise codec (``core.averaging.quantization``)."""

RUN_SETTINGS = (
    "swarm.algorithm",
    "swarm.target_batch_size",
    "swarm.outer_lr",
    "swarm.outer_momentum",
    "swarm.sync_every",
    "swarm.wire_compression",
    "swarm.rule",
    "trainer.max_steps",
    "optim.lr",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "optim.weight_decay",
)
"""What every peer of a run must agree on besides the network: how they train together, how long, and the learning
rate they follow (it is a function of the swarm step, so peers that disagree would step differently)."""


def run_settings(config: RunConfig) -> dict[str, Any]:
    """The values of ``RUN_SETTINGS`` in ``config``."""
    found = {}
    for key in RUN_SETTINGS:
        section, name = key.split(".")
        found[key] = getattr(getattr(config, section), name)
    return found


TTL = 60.0
"""Seconds a published fingerprint lives; refreshed every ``TTL / 3`` while its peer runs."""


def fingerprint_key(run_id: str) -> str:
    return f"{run_id}_fingerprint"


def run_fingerprint(net: torch.nn.Module, config: RunConfig, classes: int, settings: bool = True) -> RunFingerprint:
    """The fingerprint of a peer that trains ``net`` under ``config``: its ``digest`` hashes every tensor's name,
    shape and dtype, the image size, the number of classes and ``WIRE_FORMAT`` (model kwargs such as depth or patch
    size show in the shapes); ``hyperparameters`` holds the run settings (``RUN_SETTINGS``), compared one by one.
    The coordinator publishes none (``settings=False``): it follows whatever the peers train with."""
    model = config.model
    img_size = image_config(net, model)["input_size"][-1]
    layout = [(name, list(tensor.shape), str(tensor.dtype)) for name, tensor in net.state_dict().items()]
    text = json.dumps({"wire": WIRE_FORMAT, "img": img_size, "classes": classes, "tensors": layout})
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    parameters = sum(tensor.numel() for tensor in net.parameters())
    return RunFingerprint(
        digest=digest,
        model=model.name,
        parameters=parameters,
        img_size=img_size,
        classes=classes,
        wire_format=WIRE_FORMAT,
        hyperparameters=json.dumps(run_settings(config) if settings else {}, sort_keys=True),
    )


def read_fingerprints(dht: hivemind.DHT, run_id: str) -> list[RunFingerprint]:
    """The live fingerprints of a run's peers (and coordinator); goodbyes (None) and malformed values are skipped."""
    # hivemind types get() as "a value or a future" whichever return_future is; without it, the value (or None)
    found: ValueWithExpiration[Any] | None = dht.get(fingerprint_key(run_id), latest=True)  # pyright: ignore[reportAssignmentType]
    if found is None or not isinstance(found.value, dict):
        return []
    prints = []
    for entry in found.value.values():
        try:
            prints.append(RunFingerprint.parse_obj(entry.value))
        except Exception:  # None (a goodbye) or a record the schema validator would have refused
            continue
    return prints


def outvoted(disagree: int, agree: int) -> bool:
    """Whether records that disagree with this peer refuse it: some do, and more than agree, or none agrees."""
    return disagree > 0 and (disagree > agree or agree == 0)


def refuse_mismatch(dht: hivemind.DHT, run_id: str, mine: RunFingerprint) -> int:
    """Raise ConfigError if the live peers of ``run_id`` train something else; return how many records agree.

    A record is a stranger's claim: any node can sign one. So a mismatch refuses this peer only when the records that
    disagree outnumber those that agree, or none agrees (``outvoted``): one forged record beside one honest peer locks
    no one out, nor one forged model beside the coordinator (which publishes the model but no settings). A
    misconfigured peer meets a swarm that disagrees with it as a whole, and is refused."""
    theirs = read_fingerprints(dht, run_id)
    others = [found for found in theirs if found.digest != mine.digest]
    if outvoted(len(others), len(theirs) - len(others)):
        counts = Counter(found.describe() for found in others)
        described = "; ".join(f"{text} x{count}" for text, count in counts.items())
        raise ConfigError(
            f"run {run_id!r} trains {described}, but this peer has {mine.describe()}: it would spoil their "
            "averaging, so it does not join. Use the run's config (--coordinator URL, or the same --config and "
            "flags), or another --run-id"
        )
    ours = json.loads(mine.hyperparameters)
    with_settings = [json.loads(found.hyperparameters) for found in theirs if found.digest == mine.digest]
    with_settings = [run for run in with_settings if run]  # the coordinator publishes none
    differing = [run for run in with_settings if any(key in run and ours[key] != run[key] for key in ours)]
    if ours and outvoted(len(differing), len(with_settings) - len(differing)):
        run = Counter(json.dumps(run, sort_keys=True) for run in differing).most_common(1)[0][0]
        run = json.loads(run)
        differ = [key for key in sorted(ours) if key in run and ours[key] != run[key]]
        named = "; ".join(f"{key} = {ours[key]!r} (the run: {run[key]!r})" for key in differ)
        raise ConfigError(
            f"run {run_id!r} trains with other settings: {named}. Every peer of a run must share them; use the "
            "run's config (--coordinator URL, or the same --config and flags)"
        )
    if others or differing:
        log.warning(
            "%d of %d fingerprint records of run %r disagree with this peer's model or settings; more agree, so it "
            "joins (a misconfigured or forged record)",
            len(others) + len(differing),
            len(theirs),
            run_id,
        )
    return len(theirs) - len(others)


class FingerprintKeeper(pl.Callback):
    """Publishes this peer's fingerprint now and every ``TTL / 3`` s from a thread while it lives; says goodbye
    (None) when training ends. The coordinator uses it without Lightning: ``start`` and ``stop``."""

    def __init__(self, dht: hivemind.DHT, run_id: str, fingerprint: RunFingerprint):
        self.dht, self.key, self.fingerprint = dht, fingerprint_key(run_id), fingerprint
        self.subkey = RSASignatureValidator().local_public_key  # the key hivemind's signature validator signs with
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._store(self.fingerprint.dict(), wait=True)  # visible before the first round
        self._thread = threading.Thread(target=self._refresh, name="vitpeer-fingerprint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None or self._stopped.is_set():
            return
        self._stopped.set()
        store_farewell(self.dht, self.key, self.subkey, get_dht_time() + TTL, "fingerprint")

    def _refresh(self) -> None:
        while not self._stopped.wait(TTL / 3):
            self._store(self.fingerprint.dict(), wait=False)

    def _store(self, value: dict, wait: bool) -> None:
        try:
            self.dht.store(self.key, value, get_dht_time() + TTL, subkey=self.subkey, return_future=not wait)
        except Exception as err:  # a DHT that is shutting down: the record expires on its own
            log.debug("could not store the fingerprint: %r", err)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop()
