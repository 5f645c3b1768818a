"""``vitpeer join``: one peer's whole run, top to bottom — swarm, data, model, Lightning fit, test, results."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from monitor.peer import PeerExporter
from monitor.serve import MetricsServer
from peer.config import RunConfig
from peer.data import VisionDataModule, num_classes
from peer.module import ImageClassifier, build_model, image_config
from peer.report import SwarmReporter
from peer.strategy import HivemindStrategy
from peer.swarm import data_order_seed, join_hint, reachable_maddrs, start_dht

log = logging.getLogger(__name__)


def pick_device(accelerator: str) -> torch.device:
    """The device this peer trains on; asking for a GPU on a host without one is an error, not a silent CPU run."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError("trainer.accelerator = 'gpu' but torch sees no CUDA GPU; use 'cpu' or 'auto'")
    if accelerator in ("gpu", "auto") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_join(config: RunConfig) -> dict[str, Any]:
    """Join (or start) the swarm, train until ``trainer.max_steps`` swarm steps, test, write results; return them."""
    out = config.trainer.output_dir
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")
    pl.seed_everything(config.trainer.seed, workers=True, verbose=False)  # same initial weights on every peer

    dht = start_dht(config.swarm)
    metrics_server = None
    try:
        maddrs = reachable_maddrs(dht, config.swarm)
        if config.swarm.initial_peers:
            log.info("joined swarm %r through %d initial peer(s)", config.swarm.run_id, len(config.swarm.initial_peers))
        else:
            log.info("started a new swarm %r", config.swarm.run_id)
        log.info("others join with: %s", join_hint(maddrs, config.swarm.run_id))
        (out / "initial_peers.txt").write_text("\n".join(maddrs) + "\n")

        classes = num_classes(config.data)
        net = build_model(config.model, classes)
        data = VisionDataModule(
            config.data, image_config(net, config.model), order_seed=data_order_seed(dht, config.trainer.seed)
        )
        module = ImageClassifier(net, classes, config.optim, config.trainer.max_steps)

        exporter = PeerExporter() if config.monitor.port is not None else None
        strategy = HivemindStrategy(config.swarm, dht, device=pick_device(config.trainer.accelerator), events=exporter)
        reporter = SwarmReporter(dht, config.swarm.run_id)  # this peer's signed metrics record, once per swarm step
        if exporter is not None:
            exporter.watch(dht.peer_id.to_base58(), config.swarm.run_id, strategy, reporter)
            metrics_server = MetricsServer(exporter.registry, config.monitor.addr, config.monitor.port)
            log.info("metrics for Prometheus at %s", metrics_server.url)
        trainer = pl.Trainer(
            strategy=strategy,
            accelerator="gpu" if strategy.root_device.type == "cuda" else "cpu",
            devices=1,
            precision=config.trainer.precision,
            max_steps=config.trainer.max_steps,
            max_epochs=-1,
            check_val_every_n_epoch=config.trainer.val_every_n_epochs,
            log_every_n_steps=config.trainer.log_every_n_steps,
            gradient_clip_val=config.trainer.grad_clip,
            logger=CSVLogger(out, name="", version=""),
            callbacks=[
                ModelCheckpoint(out / "checkpoints", save_last=True, save_top_k=0),
                reporter,
            ],
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        started = time.monotonic()
        trainer.fit(module, datamodule=data, ckpt_path=config.trainer.resume)
        train_seconds = time.monotonic() - started
        swarm_epoch = trainer.global_step
        tested = trainer.test(module, datamodule=data, verbose=False)[0]
        results = {
            "swarm_epoch": swarm_epoch,
            "train_runtime": round(train_seconds, 2),
            "test_loss": tested["test/loss"],
            "test_accuracy": tested["test/acc"],
            "peer_id": dht.peer_id.to_base58(),
        }
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        log.info(
            "test accuracy %.4f after %d swarm steps (%.0f s)", results["test_accuracy"], swarm_epoch, train_seconds
        )
        return results
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        dht.shutdown()
