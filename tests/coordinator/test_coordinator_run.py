"""A real coordinator and real peers on 127.0.0.1, through every event issue 3 names.

One run, in order: two peers join with ``--coordinator URL`` and show up in ``/status``; the coordinator writes
checkpoints; forged and unsigned records are refused and counted; every peer is killed and one restarted, which
resumes from the coordinator's state; the coordinator is SIGKILLed in the middle of a checkpoint write and restarted,
and reloads the newest complete checkpoint. The best checkpoint then loads into a fresh model with the sidecar's
validation accuracy.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import hivemind
import pytest
import pytorch_lightning as pl
import timm
import torch
from hivemind.utils import get_dht_time
from processes import CONFIG, RUN_ID, Coordinator, free_port, listed, peer, peer_id, rejoin, wait_for

from vitpeer.coordinator.checkpoints import CHUNK_DELAY_ENV
from vitpeer.peer.core.config import load_config
from vitpeer.peer.core.data import VisionDataModule
from vitpeer.peer.core.model import ImageClassifier, build_model, image_config
from vitpeer.peer.core.runtime.processes import stop_all
from vitpeer.peer.core.swarm.records import metrics_key, record_validators

pytestmark = pytest.mark.slow

EVERY = 3
"""The coordinator's checkpoint interval in swarm steps."""
RUN = f"""\
base: {CONFIG}
swarm:
  progress_expiration: 6.0
"""
"""digits_tiny, but a killed peer's progress record lives 6 s instead of 20: a peer restarted after everyone was
killed trains on once the dead peers' records expire (it loads the coordinator's state, finds the dead peers' step
ahead of it and keeps reloading until then)."""


def sidecars(state_dir: Path) -> list[dict[str, Any]]:
    found = [json.loads(path.read_text()) for path in (state_dir / "checkpoints").glob("step_*.json")]
    return sorted(found, key=lambda sidecar: sidecar["swarm_epoch"])


def forge_records(initial_peers: list[str], victim_subkey: bytes) -> None:
    """A node without validators stores a record under another peer's key, and one with no key at all."""
    forger = hivemind.DHT(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        forged = {"peer_id": "forged", "step": 1, "loss": 99.0, "window_samples": 1, "samples_per_second": 1.0}
        forged |= {"samples": 1, "mini_steps": 1, "version": "x", "hardware": "x", "time": get_dht_time()}
        expiration = get_dht_time() + 60
        forger.store(metrics_key(RUN_ID), subkey=victim_subkey, value=forged, expiration_time=expiration)
        forger.store(metrics_key(RUN_ID), subkey=b"intruder", value=forged, expiration_time=expiration)
    finally:
        forger.shutdown()


def measured_val_accuracy(checkpoint: Path) -> float:
    """A fresh model from the checkpoint's weights, validated by Lightning on the run's validation split."""
    config = load_config(CONFIG)
    net = build_model(config.model, 10)
    net.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    module = ImageClassifier(net, 10, config.optim, config.trainer.max_steps)
    data = VisionDataModule(config.data, image_config(net, config.model), order_seed=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, datamodule=data, verbose=False)[0]["val/acc"]


@pytest.mark.timeout(600)
def test_coordinator_run_survives_peers_leaving_and_its_own_crash(tmp_path: Path):
    state_dir = tmp_path / "coordinator"
    (tmp_path / "run.yaml").write_text(RUN)
    coordinator = Coordinator(
        state_dir, free_port(), tmp_path / "coordinator.log", config=tmp_path / "run.yaml", checkpoint_every=EVERY
    )
    # each MiB of a checkpoint takes 0.25 s to write, so the test can kill the coordinator in the middle of one
    coordinator.start(**{CHUNK_DELAY_ENV: "0.25"})
    first_address = (state_dir / "initial_peers.txt").read_text()
    peers: list[subprocess.Popen] = []
    try:
        # 1. two peers join through the coordinator and appear in /status with their numbers
        started = time.monotonic()
        peers = [peer(1, tmp_path, coordinator), peer(2, tmp_path, coordinator)]
        ids = wait_for("both peers' ids", lambda: all(peer_id(tmp_path, i) for i in (1, 2)), 90)
        ids = [peer_id(tmp_path, i) for i in (1, 2)]
        status = wait_for("both peers in /status", lambda: set(ids) <= set(listed(s := coordinator.status())) and s, 90)
        print(f"peers appeared in /status {time.monotonic() - started:.1f} s after they were started")
        for report in listed(status).values():
            assert report["step"] >= 0 and report["samples"] > 0 and report["mini_steps"] > 0
            assert report["samples_per_second"] >= 0 and report["hardware"].startswith(("cpu", "cuda"))
        assert status["run_id"] == RUN_ID and status["alive_peers"] == 2

        # 2. checkpoints: at least two complete ones, each evaluated
        wait_for("two checkpoints", lambda: len(sidecars(state_dir)) >= 2, 240, every=1)
        status = coordinator.status()
        assert status["checkpoints"]["newest"]["swarm_epoch"] >= 2 * EVERY
        print("checkpoint write seconds:", [sidecar["write_seconds"] for sidecar in sidecars(state_dir)])

        # 3. forged and unsigned records are refused and counted; the victim's own record is untouched
        victim = hivemind.DHT(  # validators strip signatures: a node without them cannot read signed records
            initial_peers=first_address.split(),
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            record_validators=record_validators(RUN_ID),
            start=True,
        )
        try:
            victim_subkey = next(iter(victim.get(metrics_key(RUN_ID), latest=True).value))
        finally:
            victim.shutdown()
        forge_records(first_address.split(), victim_subkey)
        status = wait_for(
            "the forged records to be counted",
            lambda: (
                (s := coordinator.status())["rejected_records"]["signature"] >= 1
                and s["rejected_records"]["schema"] >= 1
                and s
            ),
            30,
        )
        assert "forged" not in listed(status) and all(report["loss"] != 99.0 for report in status["peers"])

        # 4. every peer is killed; one comes back and resumes from the coordinator's state
        for process in peers:
            process.send_signal(signal.SIGKILL)
            process.wait()
        time.sleep(3)  # a checkpoint in flight when the peers died finishes or fails
        kept = coordinator.status()["state_epoch"]
        assert kept >= 2 * EVERY
        assert rejoin(peers, 3, tmp_path, coordinator, past=kept, timeout=150) >= kept  # resumed, not restarted

        # 5. the coordinator is killed in the middle of a checkpoint write, then restarted
        before = {sidecar["file"] for sidecar in sidecars(state_dir)}
        partial = wait_for(
            "a checkpoint write in progress",
            lambda: next((path for path in (state_dir / "checkpoints").glob("*.pt.tmp") if path.stat().st_size), None),
            180,
            every=0.02,
        )
        coordinator.process.send_signal(signal.SIGKILL)
        coordinator.process.wait()
        newest_complete = sidecars(state_dir)[-1]
        assert partial.exists() and newest_complete["file"] in before
        assert partial.stat().st_size < newest_complete["bytes"], "the killed write should be partial"
        coordinator.start()
        assert (state_dir / "initial_peers.txt").read_text() == first_address, "the address must survive a restart"
        log = coordinator.log.read_text()
        assert f"resumed from checkpoint {newest_complete['file']}" in log
        assert not partial.exists() and "removing" in log
        assert coordinator.status()["state_epoch"] == newest_complete["swarm_epoch"]
    finally:
        stop_all([*peers, *filter(None, [coordinator.process])])  # at once: each clean leave takes seconds

    # 6. the best checkpoint, loaded into a fresh model, measures the sidecar's validation accuracy
    best = max(sidecars(state_dir), key=lambda sidecar: (sidecar["val_accuracy"], sidecar["swarm_epoch"]))
    assert measured_val_accuracy(state_dir / "checkpoints" / best["file"]) == pytest.approx(
        best["val_accuracy"], abs=1e-6
    )
    exported = timm.create_model(f"local-dir:{state_dir / 'best'}", pretrained=True)
    results = json.loads((state_dir / "best" / "all_results.json").read_text())
    assert results["checkpoint"] == best["file"] and results["eval_accuracy"] == best["val_accuracy"]
    reference = torch.load(state_dir / "checkpoints" / best["file"], weights_only=True)["model"]
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)
