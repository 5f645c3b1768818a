"""A malicious peer's DHT validator for the tests: several RSA keys in one node, records signed by hand."""

from __future__ import annotations

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey


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
