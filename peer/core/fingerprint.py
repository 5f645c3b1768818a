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

import hivemind
import pytorch_lightning as pl
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from vitpeer.peer.core.config import ConfigError, ModelConfig
from vitpeer.peer.core.model import image_config
from vitpeer.peer.core.records import RunFingerprint

log = logging.getLogger(__name__)

WIRE_FORMAT = 1
"""Bump when what peers exchange changes shape or meaning (tensor order, extra tensors, state layout)."""
TTL = 60.0
"""Seconds a published fingerprint lives; refreshed every ``TTL / 3`` while its peer runs."""


def fingerprint_key(run_id: str) -> str:
    return f"{run_id}_fingerprint"


def run_fingerprint(net: torch.nn.Module, model: ModelConfig, classes: int) -> RunFingerprint:
    """The fingerprint of a peer that trains ``net``: every tensor's name, shape and dtype, the image size, the
    number of classes and ``WIRE_FORMAT``, hashed. Model kwargs (depth, patch size...) show in the shapes."""
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
    )


def read_fingerprints(dht: hivemind.DHT, run_id: str) -> list[RunFingerprint]:
    """The live fingerprints of a run's peers (and coordinator); goodbyes (None) and malformed values are skipped."""
    found = dht.get(fingerprint_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    prints = []
    for entry in found.value.values():
        try:
            prints.append(RunFingerprint.parse_obj(entry.value))
        except Exception:  # None (a goodbye) or a record the schema validator would have refused
            continue
    return prints


def refuse_mismatch(dht: hivemind.DHT, run_id: str, mine: RunFingerprint) -> int:
    """Raise ConfigError if a live peer of ``run_id`` trains something else; return how many records agree."""
    theirs = read_fingerprints(dht, run_id)
    others = [found for found in theirs if found.digest != mine.digest]
    if others:
        counts = Counter(found.describe() for found in others)
        described = "; ".join(f"{text} x{count}" for text, count in counts.items())
        raise ConfigError(
            f"run {run_id!r} trains {described}, but this peer has {mine.describe()}: it would spoil their "
            "averaging, so it does not join. Use the run's config (--coordinator URL, or the same --config and "
            "flags), or another --run-id"
        )
    return len(theirs)


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
        self._store(None, wait=True)

    def _refresh(self) -> None:
        while not self._stopped.wait(TTL / 3):
            self._store(self.fingerprint.dict(), wait=False)

    def _store(self, value: dict | None, wait: bool) -> None:
        try:
            self.dht.store(self.key, value, get_dht_time() + TTL, subkey=self.subkey, return_future=not wait)
        except Exception as err:  # a DHT that is shutting down: the record expires on its own
            log.debug("could not store the fingerprint: %r", err)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop()
