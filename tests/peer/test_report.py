"""Metrics records in the DHT: a peer's own record is readable, forged, unsigned and implausible ones are refused and
counted, and readers check what their node let through."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import hivemind
import pydantic.v1
import pytest
from builders import peer_report
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from keys import Keyring, guarded_and_attacker
from processes import wait_for

from vitpeer.peer.core.config import SwarmConfig
from vitpeer.peer.core.swarm.dht import start_dht
from vitpeer.peer.core.swarm.records import (
    MAX_LOSS,
    MAX_SAMPLES_PER_SECOND,
    REPORT_TTL,
    PeerReport,
    metrics_key,
    read_reports,
    record_validators,
    rejected_records,
    signer_id,
)
from vitpeer.peer.core.swarm.reporter import SwarmReporter

RUN_ID = "report-test"


def report(loss: float) -> dict:
    return peer_report(peer_id="me", loss=loss).dict()


@pytest.mark.timeout(120)
def test_forged_unsigned_and_bogus_records_are_refused_and_counted():
    with guarded_and_attacker(record_validators(RUN_ID)) as (guarded, forger):
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
    forger_key = Forger(RSAPrivateKey())
    with guarded_and_attacker(record_validators(RUN_ID), [forger_key]) as (guarded, forger):
        key, expiration = metrics_key(RUN_ID), get_dht_time() + 60
        victim = RSASignatureValidator().local_public_key  # the guarded node signs with this process's key
        assert guarded.store(key, subkey=victim, value=report(0.5), expiration_time=expiration)

        forger.store(key, subkey=victim, value=report(99.0), expiration_time=expiration)  # signed, by the wrong key
        forger.store(key, subkey=forger_key.local_public_key, value=oversized, expiration_time=expiration)  # its own

        assert rejected_records(guarded) == {"signature": 1, "schema": 1}
        stored = guarded.get(key, latest=True).value
        assert list(stored) == [victim] and stored[victim].value["loss"] == 0.5


def claim(**values) -> dict:
    """A record as a peer would publish it now, with ``values`` claimed (unchecked: the attacker writes it by hand)."""
    return {**report(0.5), "time": get_dht_time(), **values}


@pytest.mark.timeout(60)
def test_one_key_is_one_row_however_many_subkeys_name_it():
    """hivemind's signature check accepts any subkey that contains the signer's key: ``x[owner:K]`` and
    ``[owner:K]y`` are signed by K as validly as ``[owner:K]``. Nodes refuse all but the exact ``[owner:K]``."""
    keyring = Keyring(1)
    with guarded_and_attacker(record_validators(RUN_ID), [keyring]) as (guarded, attacker):
        key, expiration, (own,) = metrics_key(RUN_ID), get_dht_time() + REPORT_TTL, keyring.keys
        for index, subkey in enumerate([own, b"x" + own, own + b"y"]):
            attacker.store(key, subkey=subkey, value=claim(peer_id=f"peer-{index}"), expiration_time=expiration)

        assert rejected_records(guarded) == {"signature": 0, "schema": 2}
        (row,) = read_reports(guarded, RUN_ID)
        assert (row.peer_id, row.signer) == ("peer-0", signer_id(own))


@pytest.mark.timeout(60)
def test_a_reader_skips_implausible_records_that_its_node_let_through():
    """A reader whose node checks signatures only (another version's, or a script's) still shows none of them."""
    keyring = Keyring(6)
    with guarded_and_attacker([RSASignatureValidator()], [keyring]) as (reader, attacker):
        now, key = get_dht_time(), metrics_key(RUN_ID)
        claims = [
            (claim(peer_id="plausible"), now + REPORT_TTL),
            (claim(loss=float("inf")), now + REPORT_TTL),
            (claim(loss=1e3, window_samples=10**12, samples=10**12), now + REPORT_TTL),
            (claim(samples_per_second=1e12), now + REPORT_TTL),
            (claim(time=now + 86_400), now + 86_400 + REPORT_TTL),  # a day ahead
            (claim(time=now - 3_600), now + REPORT_TTL),  # an hour old, kept alive
        ]
        for subkey, (value, expiration) in zip(keyring.keys, claims, strict=True):
            assert attacker.store(key, subkey=subkey, value=value, expiration_time=expiration)
        assert len(reader.get(key, latest=True).value) == len(claims)  # the reader's node let every one through

        (row,) = read_reports(reader, RUN_ID)
        assert (row.peer_id, row.signer) == ("plausible", signer_id(keyring.keys[0]))


def test_a_peers_own_report_stays_within_the_bounds_every_node_enforces():
    """hivemind's throughput estimate reads up to 1e20 after a near-zero interval (``PerformanceEMA``), and a
    diverged peer's loss has no ceiling: the reporter clamps both, so an honest peer is never refused."""
    dht = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "me"))  # publishing is not under test here
    reporter = SwarmReporter(dht, RUN_ID)
    reporter.samples, reporter.mini_steps = 64, 2
    reporter.window_loss, reporter.window_samples = 1e300 * 64, 64

    published = PeerReport(**reporter.report(step=1, samples_per_second=1e20))

    assert (published.samples_per_second, published.loss) == (MAX_SAMPLES_PER_SECOND, MAX_LOSS)
    reporter.window_loss = float("inf")  # finite losses whose sum overflowed
    assert reporter.report(step=1, samples_per_second=float("inf"))["loss"] == MAX_LOSS


def rows_of(reader: hivemind.DHT, step: int) -> list[tuple[str, int]]:
    """(signer, step) of every row ``reader`` lists, once one of them is at ``step``; else []."""
    rows = [(row.signer, row.step) for row in read_reports(reader, RUN_ID)]
    return rows if any(found == step for _, found in rows) else []


@pytest.fixture
def hivemind_signing_key():
    """hivemind's process-wide signing key, put back after the test (which plays several processes in this one)."""
    saved = RSAPrivateKey._process_wide_key
    yield
    RSAPrivateKey._process_wide_key = saved


@pytest.mark.timeout(120)
def test_a_peer_restarted_with_its_identity_is_one_row_signed_by_its_peer_id(tmp_path: Path, hivemind_signing_key):
    """A peer SIGKILLed and started again in its output directory keeps its identity file, so its peer id. hivemind
    signed its records with a key of each process: the restart was a second row in /status (and a second peer in
    hivemind's progress tracker, which sizes groups) until the old records expired (CI's hostile swarm saw 4 peers
    of 3). Signed with the identity's key, the restarted peer's record replaces its old one."""
    reader = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=record_validators(RUN_ID))
    swarm = SwarmConfig(
        run_id=RUN_ID,
        initial_peers=[str(addr) for addr in reader.get_visible_maddrs()],
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        identity_path=tmp_path / "identity.key",  # created by the first run, as ``vitpeer join`` does
    )
    peer_ids, subkeys = [], []
    try:
        for run in (1, 2):
            RSAPrivateKey._process_wide_key = None  # a new process: hivemind has not made its key yet
            peer = start_dht(swarm)
            try:
                reporter = SwarmReporter(peer, RUN_ID)  # signs as hivemind's progress tracker does: the process's key
                record = reporter.report(step=run, samples_per_second=1.0)
                assert peer.store(
                    reporter.key, subkey=reporter.subkey, value=record, expiration_time=get_dht_time() + REPORT_TTL
                )
                peer_ids.append(peer.peer_id.to_base58())
                subkeys.append(reporter.subkey)
                # the record is on the reader's node, and its signer is the peer id
                assert wait_for("the record on the reader", lambda run=run: rows_of(reader, run), 30) == [
                    (peer_ids[-1], run)
                ]
            finally:
                peer.shutdown()  # no goodbye: its record stays, as a killed peer's does

        assert peer_ids[0] == peer_ids[1]
        assert rows_of(reader, 2) == [(peer_ids[0], 2)]  # still one row: the restart's record replaced the old one
        assert subkeys[0] == subkeys[1]  # and one subkey for hivemind's progress record: one peer, not two
    finally:
        reader.shutdown()
