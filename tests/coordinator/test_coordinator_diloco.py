"""The coordinator of a ``swarm.algorithm = diloco`` run, with real hivemind on 127.0.0.1.

- In this process, a real ``DiLoCo`` peer and the coordinator's ``DiLoCoState``: the download, the checkpoint, its
  reload by a restarted coordinator and the state a joiner then loads, compared tensor by tensor.
- Real ``vitpeer coordinator`` and ``vitpeer join`` processes: two peers train a few swarm steps, the coordinator
  downloads their state and writes a checkpoint, every peer is killed, and a third peer enters at the coordinator's
  step and trains on.
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
import torch
from hivemind.compression import NoCompression
from processes import STOP_GRACE, Coordinator, free_port, peer, rejoin, wait_for

from vitpeer.coordinator.checkpoints import CheckpointStore
from vitpeer.coordinator.state import open_swarm_state
from vitpeer.peer.core.algorithms.diloco_rounds import DiLoCo
from vitpeer.peer.core.algorithms.observers import DiLoCoState
from vitpeer.peer.core.config import ConfigError, RunConfig, load_config
from vitpeer.peer.core.model import ImageClassifier, build_model
from vitpeer.peer.core.runtime.processes import stop_all

pytestmark = pytest.mark.slow

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def sidecars(state_dir: Path) -> list[dict[str, Any]]:
    found = [json.loads(path.read_text()) for path in (state_dir / "checkpoints").glob("step_*.json")]
    return sorted(found, key=lambda sidecar: sidecar["swarm_epoch"])


def diloco_peer(config: RunConfig, dht: hivemind.DHT) -> DiLoCo:
    """A diloco peer's outer loop over the run's network, its parameters taken as ``HivemindStrategy`` takes them."""
    net = build_model(config.model, 10)
    inner = ImageClassifier(net, 10, config.optim, config.trainer.max_steps).configure_optimizers()["optimizer"]
    swarm = config.swarm
    return DiLoCo(
        [param for group in inner.param_groups for param in group["params"]],
        dht=dht,
        run_id=swarm.run_id,
        target_batch_size=swarm.target_batch_size,
        outer_lr=swarm.outer_lr,
        outer_momentum=swarm.outer_momentum,
        compression=NoCompression(),
        matchmaking_time=1.0,
        averaging_timeout=5.0,
        load_state_timeout=20.0,
        progress_expiration=5.0,
        sync_every=swarm.sync_every,
    )


def assert_same(found: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(found) == len(expected)
    for index, (tensor, reference) in enumerate(zip(found, expected, strict=True)):
        torch.testing.assert_close(tensor.detach(), reference, rtol=0, atol=0, msg=f"tensor {index}")


@pytest.mark.timeout(120)
def test_coordinator_downloads_checkpoints_and_serves_the_diloco_state(tmp_path: Path):
    config = load_config(
        "digits_tiny_diloco", {"swarm.run_id": "coordinator-diloco-state", "swarm.outer_momentum": 0.9}
    )
    bootstrap = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
    nodes, running = [bootstrap], []  # what the finally block stops, newest first

    def node() -> hivemind.DHT:
        maddrs = [str(maddr) for maddr in bootstrap.get_visible_maddrs()]
        nodes.append(hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=maddrs))
        return nodes[-1]

    def started(thing):
        running.append(thing)
        return thing

    def stop(thing) -> None:
        running.remove(thing)
        thing.shutdown()

    def offers() -> dict[bytes, float]:
        """Who offers the diloco state for download, with what priority (hivemind's record)."""
        found = bootstrap.get(f"{config.swarm.run_id}_diloco.all_averagers", latest=True)
        return {key: entry.value for key, entry in found.value.items()} if found is not None else {}

    try:
        trained = started(diloco_peer(config, node()))
        torch.manual_seed(1)
        swarm = [torch.randn_like(shared) for shared in trained.shared * 2]  # shared parameters, outer momentum
        trained.restore(7, swarm)
        count = len(trained.shared)
        trained_id = trained.dht.peer_id.to_bytes()
        wait_for("the peer's offer", lambda: offers().get(trained_id) == 7.0, 30)

        # the coordinator downloads the peer's state: its network holds the shared parameters
        coordinator = started(open_swarm_state(config, node()))
        assert isinstance(coordinator, DiLoCoState)
        assert coordinator.download(timeout=30) and coordinator.epoch == 7
        assert_same(coordinator.params, swarm[:count])
        assert_same(coordinator.momentum, swarm[count:])
        assert not coordinator.download(timeout=30), "the same swarm step again is nothing newer"

        # its checkpoint, reloaded by a restarted coordinator, serves the same state below the live peer
        store = CheckpointStore(tmp_path / "checkpoints")
        store.commit(store.save(coordinator.state_dict()), {"swarm_epoch": coordinator.epoch})
        stop(coordinator)
        restarted = started(open_swarm_state(config, node()))
        restarted.load_state_dict(store.load_newest()[1])
        assert restarted.epoch == 7
        assert_same(restarted.params, swarm[:count])
        restarted_id = restarted.averager.peer_id.to_bytes()
        found = wait_for("the coordinator's offer", lambda: restarted_id in (found := offers()) and found, 30)
        assert found[trained_id] == 7.0 and found[restarted_id] == 6.5

        # every peer leaves; a joiner gets the coordinator's copy, in the layout DiLoCo itself serves
        stop(trained)
        joiner = started(diloco_peer(config, node()))
        assert joiner.load_state_from_peers() and joiner.epoch == 7
        assert_same(joiner.outer_state()[1], swarm)
        assert_same(joiner.params, swarm[:count])

        gradient_checkpoint = {"model": restarted.net.state_dict(), "optimizer": {}, "swarm_epoch": 3}
        with pytest.raises(ConfigError, match="'gradient' run"):
            restarted.load_state_dict(gradient_checkpoint)
    finally:
        for thing in reversed(running):
            thing.shutdown()
        for dht in reversed(nodes):
            dht.shutdown()


EVERY = 3
"""The coordinator's checkpoint interval in swarm steps."""
RUN = """\
base: digits_tiny_diloco
data:
  batch_size: 32
swarm:
  run_id: coordinator-diloco-run
  target_batch_size: 256
  outer_momentum: 0.5
  matchmaking_time: 1.0
  averaging_timeout: 10
"""
"""digits_tiny_diloco with short swarm steps, and outer momentum, which the coordinator must keep too."""


@pytest.mark.timeout(300)
def test_a_peer_joining_after_everyone_left_enters_at_the_coordinators_step(tmp_path: Path):
    (tmp_path / "run.yaml").write_text(RUN)
    state_dir = tmp_path / "coordinator"
    log = tmp_path / "coordinator.log"
    coordinator = Coordinator(state_dir, free_port(), log, config=tmp_path / "run.yaml", checkpoint_every=EVERY)
    coordinator.start()
    peers: list[subprocess.Popen] = []
    try:
        peers = [peer(1, tmp_path, coordinator), peer(2, tmp_path, coordinator)]
        wait_for("a checkpoint of the diloco run", lambda: sidecars(state_dir), 180, every=1)

        for process in peers:  # every peer leaves at once
            process.send_signal(signal.SIGKILL)
            process.wait()
        time.sleep(3)  # a checkpoint in flight when the peers died finishes or fails
        kept = wait_for(  # what the coordinator serves is what it checkpointed last
            "the served state to be the newest checkpoint's",
            lambda: (epoch := coordinator.status()["state_epoch"]) == sidecars(state_dir)[-1]["swarm_epoch"] and epoch,
            15,
        )
        newest = sidecars(state_dir)[-1]

        # the checkpoint holds the peers' trained parameters, not the coordinator's initial ones, and the momentum
        saved = torch.load(state_dir / "checkpoints" / newest["file"], weights_only=True)
        config = load_config(str(tmp_path / "run.yaml"))
        pl.seed_everything(config.trainer.seed, verbose=False)  # as every peer and the coordinator start
        initial = build_model(config.model, 10)
        assert saved["algorithm"] == "diloco" and saved["swarm_epoch"] == kept
        assert any(not torch.equal(saved["model"][name], tensor) for name, tensor in initial.state_dict().items())
        assert len(saved["outer_momentum"]) == len(list(initial.parameters()))
        assert any(bool(momentum.abs().sum() > 0) for momentum in saved["outer_momentum"])
        print(f"checkpoint at swarm step {kept}: val accuracy {newest['val_accuracy']:.3f}")

        assert rejoin(peers, 3, tmp_path, coordinator, past=kept, timeout=90) == kept  # the coordinator's state
    finally:
        stop_all([*peers, *filter(None, [coordinator.process])], grace=STOP_GRACE)
