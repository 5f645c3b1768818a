"""A malicious peer for the tests: a DHT validator holding several RSA keys that signs records by hand, and a node of
the attacker's joined to a node under test."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class Keyring(RecordValidatorBase):
    """One node holding ``count`` peers' keys: signs each record with the key its subkey names, and keeps whatever it
    stores (no schema, no bounds), as a node of another version or a hostile one would."""

    def __init__(self, count: int):
        self.signers = [RSASignatureValidator(RSAPrivateKey()) for _ in range(count)]
        self.keys = [signer.local_public_key for signer in self.signers]

    def sign_value(self, record: DHTRecord) -> bytes:
        for signer in self.signers:
            if signer.local_public_key in record.subkey:
                return signer.sign_value(record)
        return record.value

    def validate(self, record: DHTRecord) -> bool:
        return True


@contextmanager
def guarded_and_attacker(
    guard: Sequence[RecordValidatorBase], attack: Sequence[RecordValidatorBase] = ()
) -> Iterator[tuple[hivemind.DHT, hivemind.DHT]]:
    """A DHT node on loopback with ``guard`` as its record validators (the node under test), and an attacker's node
    joined to it with ``attack`` as its own; both shut down on the way out."""
    guarded = hivemind.DHT(start=True, host_maddrs=LOOPBACK, record_validators=list(guard))
    try:
        initial_peers = [str(addr) for addr in guarded.get_visible_maddrs()]
        attacker = hivemind.DHT(
            start=True, host_maddrs=LOOPBACK, initial_peers=initial_peers, record_validators=list(attack)
        )
        try:
            yield guarded, attacker
        finally:
            attacker.shutdown()
    finally:
        guarded.shutdown()
