"""``vitpeer join``: one peer's whole run, top to bottom — swarm, data, model, Lightning fit, test, results."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

import hivemind
import pytorch_lightning as pl
import torch
from torch.distributed.tensor import DTensor

from monitor.peer import PeerExporter
from monitor.serve import MetricsServer
from peer.config import RunConfig
from peer.data import VisionDataModule, num_classes
from peer.module import ImageClassifier, build_model, image_config
from peer.parallel import sharder
from peer.report import SwarmReporter
from peer.strategy import HivemindDDPStrategy, HivemindFSDPStrategy, HivemindStrategy, SwarmEvents, _SwarmSteps
from peer.swarm import data_order_seed, join_hint, reachable_maddrs, start_dht
from peer.train import checkpoints, trainer_args

log = logging.getLogger(__name__)


def pick_device(accelerator: str) -> torch.device:
    """The device this peer trains on; asking for a GPU on a host without one is an error, not a silent CPU run."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError("trainer.accelerator = 'gpu' but torch sees no CUDA GPU; use 'cpu' or 'auto'")
    if accelerator in ("gpu", "auto") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


ORDER_SEED_ENV = "VITPEER_DATA_ORDER_SEED"
"""The leader's data-order seed, passed to the local ranks Lightning starts (they inherit the environment)."""


def make_strategy(config: RunConfig, dht: hivemind.DHT | None, events: SwarmEvents | None) -> _SwarmSteps:
    """One device, or this host's ``parallel.devices`` as one peer (DDP or FSDP inside the host)."""
    parallel = config.parallel
    if parallel.num_nodes != 1:
        raise ValueError(f"parallel.num_nodes = {parallel.num_nodes}: a peer is one host; start a peer on each node")
    if parallel.strategy == "fsdp":
        return HivemindFSDPStrategy(config.swarm, dht, devices=parallel.devices, events=events)
    if parallel.strategy == "ddp":
        return HivemindDDPStrategy(config.swarm, dht, events=events)
    return HivemindStrategy(config.swarm, dht, device=pick_device(config.trainer.accelerator), events=events)


def run_join(config: RunConfig) -> dict[str, Any] | None:
    """Join (or start) the swarm, train until ``trainer.max_steps`` swarm steps, test, write results; return them.

    With ``parallel.strategy = 'ddp'`` Lightning starts local ranks 1..N-1 by running this same command again
    (``LOCAL_RANK`` set): they follow the leader (see ``peer.strategy._SwarmSteps``) and touch neither the DHT nor
    the output files. They return None."""
    leader = os.environ.get("LOCAL_RANK", "0") == "0"
    out = config.trainer.output_dir
    if leader:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.yaml")
    pl.seed_everything(config.trainer.seed, workers=True, verbose=False)  # same initial weights on every peer

    dht = start_dht(config.swarm) if leader else None
    metrics_server = None
    try:
        if dht is not None:
            maddrs = reachable_maddrs(dht, config.swarm)
            if config.swarm.initial_peers:
                count = len(config.swarm.initial_peers)
                log.info("joined swarm %r through %d initial peer(s)", config.swarm.run_id, count)
            else:
                log.info("started a new swarm %r", config.swarm.run_id)
            log.info("others join with: %s", join_hint(maddrs, config.swarm.run_id))
            (out / "initial_peers.txt").write_text("\n".join(maddrs) + "\n")
            os.environ[ORDER_SEED_ENV] = str(data_order_seed(dht, config.trainer.seed))

        classes = num_classes(config.data)
        net = build_model(config.model, classes)
        data = VisionDataModule(
            config.data, image_config(net, config.model), order_seed=int(os.environ[ORDER_SEED_ENV])
        )
        module = ImageClassifier(net, classes, config.optim, config.trainer.max_steps, shard=sharder(config.parallel))

        exporter = PeerExporter() if dht is not None and config.monitor.port is not None else None
        strategy = make_strategy(config, dht, exporter)
        callbacks: list[pl.Callback] = [checkpoints(out)]
        reporter = None
        if dht is not None:
            reporter = SwarmReporter(dht, config.swarm.run_id)  # this peer's signed metrics record, once per swarm step
            callbacks.append(reporter)
        if exporter is not None:
            exporter.watch(dht.peer_id.to_base58(), config.swarm.run_id, strategy, reporter)
            metrics_server = MetricsServer(exporter.registry, config.monitor.addr, config.monitor.port)
            log.info("metrics for Prometheus at %s", metrics_server.url)
        trainer = pl.Trainer(
            strategy=strategy, accelerator=accelerator(config), callbacks=callbacks, **trainer_args(config)
        )
        started = time.monotonic()
        trainer.fit(module, datamodule=data, ckpt_path=config.trainer.resume)
        train_seconds = time.monotonic() - started
        swarm_epoch = trainer.global_step
        tested = trainer.test(module, datamodule=data, verbose=False)[0]
        if trainer.world_size > 1:  # each rank says what it holds: the ranks must agree, bit for bit
            log.info("local rank %d of %d: parameters sha256 %s", trainer.local_rank, trainer.world_size, digest(net))
        if reporter is None:
            return None
        results = {
            "swarm_epoch": swarm_epoch,
            "train_runtime": round(train_seconds, 2),
            "test_loss": tested["test/loss"],
            "test_accuracy": tested["test/acc"],
            "peer_id": dht.peer_id.to_base58(),
            "local_ranks": trainer.world_size,
            "samples_contributed": reporter.samples,
            "local_steps": reporter.mini_steps,
        }
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        log.info(
            "test accuracy %.4f after %d swarm steps (%.0f s)", results["test_accuracy"], swarm_epoch, train_seconds
        )
        return results
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        if dht is not None:
            dht.shutdown()


def accelerator(config: RunConfig) -> str:
    """Lightning's accelerator name: a single device as ``pick_device`` chose it; DDP ranks on GPUs when there are."""
    if config.parallel.strategy == "single":
        return "gpu" if pick_device(config.trainer.accelerator).type == "cuda" else "cpu"
    return config.trainer.accelerator


def digest(net: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in order: equal digests, identical replicas. Sharded (FSDP)
    tensors are gathered whole first, which every rank does together."""
    hasher = hashlib.sha256()
    for tensor in net.state_dict().values():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        hasher.update(full.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]
