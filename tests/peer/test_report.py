"""Metrics records in the DHT: a peer's own record is readable, forged and unsigned ones are refused and counted."""

from __future__ import annotations

import hivemind
import pydantic.v1
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from vitpeer.peer.core.records import PeerReport, metrics_key, record_validators, rejected_records

RUN_ID = "report-test"


def report(loss: float) -> dict:
    return PeerReport(
        peer_id="me",
        step=3,
        loss=loss,
        window_samples=32,
        samples_per_second=10.0,
        samples=96,
        mini_steps=3,
        version="test",
        hardware="cpu",
        time=get_dht_time(),
    ).dict()


@pytest.mark.timeout(120)
def test_forged_unsigned_and_bogus_records_are_refused_and_counted():
    guarded = hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=record_validators(RUN_ID)
    )
    initial_peers = [str(addr) for addr in guarded.get_visible_maddrs()]
    forger = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers)
    try:
        key, expiration = metrics_key(RUN_ID), get_dht_time() + 60
        own = RSASignatureValidator().local_public_key  # the guarded node signs with this process's key
        assert guarded.store(key, subkey=own, value=report(0.5), expiration_time=expiration)

        forger.store(
            key, subkey=own, value=report(99.0), expiration_time=expiration
        )  # someone else's key, no signature
        forger.store(key, subkey=b"unsigned", value=report(99.0), expiration_time=expiration)
        forger.store(key, subkey=b"[owner:not-a-key]", value=report(99.0), expiration_time=expiration)

        assert rejected_records(guarded) == {"signature": 2, "schema": 1}
        stored = guarded.get(key, latest=True).value
        assert list(stored) == [own] and stored[own].value["loss"] == 0.5
    finally:
        forger.shutdown()
        guarded.shutdown()


class Forger(RSASignatureValidator):
    """Signs every record whose subkey names a public key with its own private key: a peer that writes under
    another peer's subkey with a real, but wrong, signature. Its own node keeps whatever it stores."""

    def sign_value(self, record: DHTRecord) -> bytes:
        if not self._PUBLIC_KEY_RE.search(record.subkey or b""):
            return record.value
        return record.value + self.SIGNATURE_FORMAT.replace(
            b"_value_", self._private_key.sign(self._serialize_record(record))
        )

    def validate(self, record: DHTRecord) -> bool:
        return True


@pytest.mark.timeout(120)
def test_oversized_and_forged_records_are_refused_and_the_real_one_survives():
    oversized = {**report(1.0), "hardware": "x" * 10_000}  # 10 kB where a GPU's name goes
    with pytest.raises(pydantic.v1.ValidationError, match="hardware"):
        PeerReport(**oversized)
    guarded = hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=record_validators(RUN_ID)
    )
    forger_key = Forger(RSAPrivateKey())
    initial_peers = [str(addr) for addr in guarded.get_visible_maddrs()]
    forger = hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers, record_validators=[forger_key]
    )
    try:
        key, expiration = metrics_key(RUN_ID), get_dht_time() + 60
        victim = RSASignatureValidator().local_public_key  # the guarded node signs with this process's key
        assert guarded.store(key, subkey=victim, value=report(0.5), expiration_time=expiration)

        forger.store(key, subkey=victim, value=report(99.0), expiration_time=expiration)  # signed, by the wrong key
        forger.store(key, subkey=forger_key.local_public_key, value=oversized, expiration_time=expiration)  # its own

        assert rejected_records(guarded) == {"signature": 1, "schema": 1}
        stored = guarded.get(key, latest=True).value
        assert list(stored) == [victim] and stored[victim].value["loss"] == 0.5
    finally:
        forger.shutdown()
        guarded.shutdown()
