"""A metrics record's bounds and its identity: what one peer can claim, and the key that signed it."""

from __future__ import annotations

import json
from pathlib import Path

import hivemind
import pydantic.v1
import pytest
from builders import peer_report
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from keys import Keyring, guarded_and_attacker

from vitpeer.peer.core.config import ConfigError
from vitpeer.peer.core.swarm.fingerprint import fingerprint_key, refuse_mismatch
from vitpeer.peer.core.swarm.records import (
    MAX_CLOCK_AHEAD,
    MAX_LOSS,
    MAX_SAMPLES_PER_SECOND,
    MAX_WINDOW_SAMPLES,
    REPORT_TTL,
    PeerReport,
    RunFingerprint,
    SignedReport,
    aggregate,
    out_of_bounds,
    record_validators,
    signer_id,
)

HONEST = peer_report(time=1_700_000_000.0).dict()
"""A well-formed record of peer ``honest``, at a fixed time."""


@pytest.mark.parametrize(
    "claim",
    [
        {"loss": float("inf")},
        {"loss": float("nan")},
        {"loss": MAX_LOSS * 10},
        {"samples_per_second": float("inf")},
        {"samples_per_second": MAX_SAMPLES_PER_SECOND * 10},
        {"window_samples": MAX_WINDOW_SAMPLES + 1, "samples": MAX_WINDOW_SAMPLES + 1},
        {"window_samples": 97},  # more than the peer's samples
        {"mini_steps": 97},  # a local step without a sample
        {"rounds": 2, "averaged_rounds": 2, "failed_rounds": 1},
        {"time": float("inf")},
        {"compute_seconds": float("inf")},
        {"sent_bytes": 2**64},
    ],
    ids=lambda claim: ",".join(claim),
)
def test_a_record_beyond_what_one_peer_can_do_does_not_parse(claim: dict):
    PeerReport(**HONEST)
    with pytest.raises(pydantic.v1.ValidationError):
        PeerReport(**{**HONEST, **claim})


def test_a_record_out_of_its_time_window_is_out_of_bounds():
    now = HONEST["time"]
    honest = PeerReport(**HONEST)
    assert out_of_bounds(honest, now + REPORT_TTL, now + 1) is None
    assert out_of_bounds(honest, now + REPORT_TTL, now - MAX_CLOCK_AHEAD + 1) is None  # a clock a little ahead
    future = PeerReport(**{**HONEST, "time": now + 86_400})
    assert "ahead" in out_of_bounds(future, now + 86_400 + REPORT_TTL, now)
    assert "expires" in out_of_bounds(honest, now + 365 * 86_400, now)  # kept alive for a year
    assert "expires" in out_of_bounds(honest, now - 1, now - 2)  # expires before it was written
    old = PeerReport(**{**HONEST, "time": now - 3_600})
    assert "expires" in out_of_bounds(old, now + REPORT_TTL, now)  # an hour old, kept alive


def test_two_signers_claiming_one_peer_id_are_two_rows_in_the_swarm_figures():
    """``aggregate`` takes what ``read_reports`` gives, one report per signer: both count, neither hides the other."""
    victim = SignedReport(**HONEST, signer="victim-key")
    impostor = SignedReport(**{**HONEST, "loss": 1.5, "time": HONEST["time"] + 1}, signer="impostor-key")
    swarm = aggregate([victim, impostor])
    assert [(row["peer_id"], row["signer"], row["loss"]) for row in swarm["peers"]] == [
        ("honest", "victim-key", 0.5),
        ("honest", "impostor-key", 1.5),
    ]
    assert (swarm["alive_peers"], swarm["loss"], swarm["samples_per_second"]) == (2, 1.0, 20.0)


def test_one_record_claiming_a_huge_step_does_not_move_the_swarm_step():
    """The coordinator checkpoints when the swarm step moves: a record at step 2**53 once made it download and evaluate
    at every poll. The swarm step is the newest within one of the step most records agree on, never past max_steps."""
    honest = [SignedReport(**{**HONEST, "step": step}, signer=f"peer-{step}") for step in (40, 41)]
    forged = SignedReport(**{**HONEST, "step": 2**53}, signer="forger")
    assert aggregate([*honest, forged], max_steps=1000)["swarm_epoch"] == 41
    assert aggregate([honest[0], forged], max_steps=1000)["swarm_epoch"] == 40  # with two, max_steps bounds it
    assert aggregate([*honest, forged])["swarm_epoch"] == 41
    assert aggregate([forged], max_steps=1000)["swarm_epoch"] is None


@pytest.mark.timeout(60)
def test_signer_id_is_the_libp2p_peer_id_its_key_would_have_as_an_identity(tmp_path: Path):
    """The derivation is libp2p's: a DHT started with an RSA identity has the peer id ``signer_id`` gives for that
    key. So a peer's ``peer_id`` could be checked against its record's signer if it signed with its identity key."""
    identity = tmp_path / "identity.key"
    P2P.generate_identity(str(identity))  # hivemind's own: an RSA key in libp2p's protobuf
    der = crypto_pb2.PrivateKey.FromString(identity.read_bytes()).data
    public = serialization.load_der_private_key(der, password=None).public_key()
    openssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    subkey = RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", openssh)

    assert signer_id(subkey) == PeerID.from_identity(identity.read_bytes()).to_base58()
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(identity))
    try:
        assert dht.peer_id.to_base58() == signer_id(subkey)
    finally:
        dht.shutdown()
    # a plain hivemind node signs records with another key, the process's (``start_dht`` makes it the identity's)
    assert signer_id(RSASignatureValidator().local_public_key) != signer_id(subkey)
    with pytest.raises(ValueError, match="one public key"):
        signer_id(b"no key here")


def test_one_forged_fingerprint_locks_no_newcomer_out_and_a_misconfigured_one_is_still_refused():
    """A node of the attacker's (its own keys) publishes a fingerprint of another model and one of the same model with
    another learning rate, beside one honest peer's. A newcomer training the run's model with the run's settings
    joins; one with another learning rate, or another model, is refused: the swarm disagrees with it as a whole."""
    run_id = "forged-fingerprint"
    keyring = Keyring(3)
    honest = RunFingerprint(
        digest="a" * 16,
        model="vit_tiny_patch16_224",
        parameters=5_000_000,
        img_size=32,
        classes=10,
        wire_format=2,
        hyperparameters=json.dumps({"optim.lr": 0.003, "trainer.max_steps": 30}),
    )
    lr_half = json.dumps({"optim.lr": 0.5, "trainer.max_steps": 30})
    forged = [
        honest.dict(),
        {**honest.dict(), "digest": "b" * 16},
        {**honest.dict(), "hyperparameters": lr_half},
    ]
    with guarded_and_attacker(record_validators(run_id), [keyring]) as (newcomer, attacker):
        expiration = get_dht_time() + 60
        for subkey, value in zip(keyring.keys, forged, strict=True):  # the first one stands for the honest peer
            assert attacker.store(fingerprint_key(run_id), value, expiration, subkey=subkey)
        assert refuse_mismatch(newcomer, run_id, honest) == 2  # two records agree on the model: it joins
        other_lr = honest.copy(update={"hyperparameters": json.dumps({"optim.lr": 0.1, "trainer.max_steps": 30})})
        with pytest.raises(ConfigError, match=r"optim.lr = 0.1 \(the run: (0.003|0.5)\)"):
            refuse_mismatch(newcomer, run_id, other_lr)
        with pytest.raises(ConfigError, match="does not join"):
            refuse_mismatch(newcomer, run_id, honest.copy(update={"digest": "c" * 16}))
