"""HivemindStrategy on its own: one real peer on 127.0.0.1, the embedded digits, a few swarm steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from fits import fit

from vitpeer.peer.core.config import load_config
from vitpeer.peer.core.data import VisionDataModule
from vitpeer.peer.core.lightning.progress import ProgressBar
from vitpeer.peer.core.lightning.strategy import HivemindStrategy
from vitpeer.peer.core.model import ImageClassifier, Schedule, build_model, image_config
from vitpeer.peer.core.swarm.dht import start_dht

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def config(tmp_path: Path):
    return load_config(
        "digits_tiny_gradient",
        {
            "swarm.host_maddrs": ["/ip4/127.0.0.1/tcp/0"],
            "swarm.run_id": f"strategy-test-{tmp_path.name}",
            "swarm.target_batch_size": 64,
            "trainer.max_steps": 4,
        },
    )


def test_global_step_and_lr_follow_swarm_steps_and_checkpoint_restores_them(config, tmp_path: Path):
    dht = start_dht(config.swarm)
    try:
        strategy = HivemindStrategy(config.swarm, dht)
        trainer = fit(config, strategy, 3, tmp_path, callbacks=[ProgressBar()])
        opt = strategy.optimizer
        assert opt.local_epoch == 3 and trainer.global_step == 3
        # 64 samples per swarm step at 32 per local step: Lightning ran 6 local steps for 3 swarm steps
        assert trainer.fit_loop.epoch_loop._batches_that_stepped == 6
        schedule = Schedule("cosine", config.optim.warmup_steps, config.trainer.max_steps)
        assert opt.opt.param_groups[0]["lr"] == pytest.approx(config.optim.lr * schedule(3))

        # the progress bar shows the swarm's numbers beside the loss
        bar = next(callback for callback in trainer.callbacks if isinstance(callback, ProgressBar))
        shown = bar.get_metrics(trainer, trainer.lightning_module)
        assert shown["swarm"] == "3/3" and shown["peers"] == 1 and shown["samples"].endswith("/64")
        assert float(shown["lr"]) == pytest.approx(opt.opt.param_groups[0]["lr"], rel=1e-2)
        assert float(shown["samples/s"]) > 0 and "train/loss" in shown

        checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
        assert checkpoint["swarm_epoch"] == 3
        assert checkpoint["optimizer_states"][0]["state"]["local_epoch"] == 3

    finally:
        dht.shutdown()

    # resume as a restarted peer does: a new process state, a new DHT node (reusing one DHT for a second
    # hivemind.Optimizer in the same process hung once in add_validators on a fresh clone)
    dht = start_dht(config.swarm)
    try:
        strategy = HivemindStrategy(config.swarm, dht)
        trainer = fit(config, strategy, 4, tmp_path / "resumed", resume=tmp_path / "last.ckpt")
        assert strategy.optimizer.local_epoch == 4 and trainer.global_step == 4
        assert strategy.optimizer.opt.param_groups[0]["lr"] == pytest.approx(config.optim.lr * schedule(4))
    finally:
        dht.shutdown()


@pytest.mark.gpu
def test_fp16_mixed_is_refused_with_the_alternative(config, tmp_path: Path):
    """On a CPU Lightning itself swaps 16-mixed for bf16-mixed, so the refusal only shows on a GPU."""
    dht = start_dht(config.swarm)
    try:
        net = build_model(config.model, 10)
        module = ImageClassifier(net, 10, config.optim, 2)
        data = VisionDataModule(config.data, image_config(net, config.model), order_seed=1)
        trainer = pl.Trainer(
            strategy=HivemindStrategy(config.swarm, dht, device="cuda"),
            accelerator="gpu",
            precision="16-mixed",
            max_steps=2,
            logger=False,
            enable_progress_bar=False,
        )
        with pytest.raises(ValueError, match="bf16-mixed"):
            trainer.fit(module, datamodule=data)
    finally:
        dht.shutdown()


def test_overlap_trains_a_lone_peer_and_warns_that_it_is_experimental(config, tmp_path: Path, caplog):
    """``--overlap`` did not learn in our 2-peer runs (README, known limits): whoever turns it on is told so."""
    config.swarm.overlap = True
    dht = start_dht(config.swarm)
    try:
        with caplog.at_level("WARNING", logger="vitpeer.peer.core.lightning.strategy"):
            strategy = HivemindStrategy(config.swarm, dht)
            trainer = fit(config, strategy, 2, tmp_path)
        assert strategy.optimizer.local_epoch == 2 and trainer.global_step == 2
        assert any("swarm.overlap is experimental" in record.getMessage() for record in caplog.records)
    finally:
        dht.shutdown()


def test_unreachable_initial_peer_is_reported(config):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWPTNKP3hSWvWP54hH9AGzu5mPA7wpXLpZc5PPnNGmwA2u"
    swarm = config.swarm.model_copy(update={"initial_peers": [dead]})
    with pytest.raises(RuntimeError, match="none of the initial peers answered"):
        start_dht(swarm)
