"""``vitpeer join``: one peer's whole run, top to bottom — swarm, data, model, Lightning fit, test, results."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

import hivemind
import pytorch_lightning as pl
import torch
from torch.distributed.tensor import DTensor

from vitpeer.monitor.exporter import PeerExporter
from vitpeer.peer.commands.train import RunStats, run_callbacks, trainer_args, write_results
from vitpeer.peer.core.config import ConfigError, RunConfig
from vitpeer.peer.core.data import VisionDataModule, num_classes
from vitpeer.peer.core.fingerprint import FingerprintKeeper, refuse_mismatch, run_fingerprint
from vitpeer.peer.core.http import MetricsServer
from vitpeer.peer.core.leave import LeaveOnSignal
from vitpeer.peer.core.model import ImageClassifier, build_model, image_config
from vitpeer.peer.core.parallel import check_precision, device_type, sharder
from vitpeer.peer.core.reporter import SwarmReporter
from vitpeer.peer.core.strategy import (
    HivemindDDPStrategy,
    HivemindFSDPStrategy,
    HivemindStrategy,
    SwarmEvents,
    _SwarmSteps,
)
from vitpeer.peer.core.swarm import data_order_seed, join_hint, reachable_maddrs, start_dht

log = logging.getLogger(__name__)


def pick_device(accelerator: str) -> torch.device:
    """The device a one-device peer trains on (see ``vitpeer.peer.core.parallel.device_type``)."""
    if device_type(accelerator) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


ORDER_SEED_ENV = "VITPEER_DATA_ORDER_SEED"
"""The leader's data-order seed, passed to the local ranks Lightning starts (they inherit the environment)."""


def refuse_in_swarm(config: RunConfig) -> None:
    """What ``vitpeer train`` offers and a swarm cannot do, refused with the reason and what to set instead."""
    trainer = config.trainer
    if trainer.accumulate_grad_batches != 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches = {trainer.accumulate_grad_batches}: in a swarm the peers already "
            f"accumulate gradients until they reach swarm.target_batch_size ({config.swarm.target_batch_size}) "
            "samples together; raise that instead and leave accumulate_grad_batches at 1"
        )
    if trainer.early_stopping_patience is not None:
        raise ConfigError(
            "trainer.early_stopping_patience: a swarm step belongs to every peer, so one peer cannot stop the run "
            "early; set trainer.max_steps (or stop a volunteer with Ctrl-C) instead"
        )
    try:
        check_precision(trainer.precision, device_type(trainer.accelerator), swarm=True)
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
    (``LOCAL_RANK`` set): they follow the leader (see ``core.strategy._SwarmSteps``) and touch neither the DHT nor
    the output files. They return None."""
    refuse_in_swarm(config)
    leave = LeaveOnSignal()
    leave.install()  # from here on, SIGTERM or Ctrl-C means: leave cleanly
    leader = os.environ.get("LOCAL_RANK", "0") == "0"
    out = config.trainer.output_dir
    if config.swarm.identity_path is None:  # the same peer id after a restart: the key lives with the run's files
        config.swarm.identity_path = out / "identity.key"
    if leader:
        out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(config.trainer.seed, workers=True, verbose=False)  # same initial weights on every peer

    dht = start_dht(config.swarm) if leader else None
    if leader:  # once the swarm is reached: a peer that could not join leaves an earlier run's config.yaml as it was
        config.write_to(out)
    metrics_server = None
    try:
        if dht is not None:
            maddrs = reachable_maddrs(dht, config.swarm)
            (out / "initial_peers.txt").write_text("\n".join(maddrs) + "\n")
            os.environ[ORDER_SEED_ENV] = str(data_order_seed(dht, config.trainer.seed))

        classes = num_classes(config.data)
        net = build_model(config.model, classes)
        images = image_config(net, config.model)
        data = VisionDataModule(config.data, images, order_seed=int(os.environ[ORDER_SEED_ENV]))
        fingerprint = None
        if dht is not None:  # before anything reaches the swarm: a peer that trains something else stops here
            fingerprint = run_fingerprint(net, config.model, classes)
            refuse_mismatch(dht, config.swarm.run_id, fingerprint)
        module = ImageClassifier(net, classes, config.optim, config.trainer.max_steps, shard=sharder(config.parallel))

        exporter = PeerExporter() if dht is not None and config.monitor.port is not None else None
        strategy = make_strategy(config, dht, exporter)
        stats = RunStats()
        callbacks: list[pl.Callback] = [*run_callbacks(config), stats]
        reporter = None
        if dht is not None:
            reporter = SwarmReporter(dht, config.swarm.run_id)  # this peer's signed metrics record, once per swarm step
            keeper = FingerprintKeeper(dht, config.swarm.run_id, fingerprint)
            keeper.start()
            callbacks += [reporter, keeper]
        if exporter is not None:
            exporter.watch(dht.peer_id.to_base58(), config.swarm.run_id, strategy, reporter)
            metrics_server = MetricsServer(exporter.registry, config.monitor.addr, config.monitor.port)
        strategy.leave = leave.requested
        leave.while_leaving.append(strategy.stop_averaging_state)
        callbacks.append(leave)
        trainer = pl.Trainer(
            strategy=strategy, accelerator=accelerator(config), callbacks=callbacks, **trainer_args(config)
        )
        if dht is not None:
            log.info("%s", startup_summary(config, dht, maddrs, trainer, metrics_server))

            def leave_now() -> None:
                """Past the leave's deadline, from its thread, while the loop waits in a round: save what the
                parameters are (one device: nothing writes them during the wait), say goodbye, stop the DHT."""
                if trainer.world_size == 1:
                    trainer.save_checkpoint(out / "checkpoints" / "last.ckpt")
                strategy.say_goodbye()
                write_results(out, {"swarm_epoch": strategy.swarm_epoch, "left_early": True, "step_finished": False})
                dht.shutdown()  # and its p2p daemon

            leave.past_deadline.append(leave_now)
        started = time.monotonic()
        trainer.fit(module, datamodule=data, ckpt_path=config.trainer.resume, weights_only=True)  # never unpickle code
        leave.settled.set()  # the step and the checkpoint are done: no deadline exit while results are written
        train_seconds = time.monotonic() - started
        swarm_epoch = trainer.global_step
        summary = stats.summary(trainer)
        if leave.requested.is_set():  # leaving: the checkpoint is written; testing would keep the volunteer waiting
            if dht is not None:
                write_results(out, {"swarm_epoch": swarm_epoch, "left_early": True, **summary})
                log.info("left the swarm at swarm step %d; checkpoint in %s", swarm_epoch, out / "checkpoints")
            return None
        validated = trainer.validate(module, datamodule=data, verbose=False)[0]
        tested = trainer.test(module, datamodule=data, verbose=False)[0]
        if trainer.world_size > 1:  # each rank says what it holds: the ranks must agree, bit for bit
            log.info("local rank %d of %d: parameters sha256 %s", trainer.local_rank, trainer.world_size, digest(net))
        if reporter is None:
            return None
        results = {
            "swarm_epoch": swarm_epoch,
            **summary,
            "train_runtime": round(train_seconds, 2),  # from fit's start: joining and downloading the state count
            "eval_loss": validated["val/loss"],
            "eval_accuracy": validated["val/acc"],
            "test_loss": tested["test/loss"],
            "test_accuracy": tested["test/acc"],
            "peer_id": dht.peer_id.to_base58(),
            "local_ranks": trainer.world_size,
            "samples_contributed": reporter.samples,
            "local_steps": reporter.mini_steps,
            "batches_skipped_nonfinite": strategy.optimizer.skipped_batches,
        }
        write_results(out, results)
        log.info(
            "test accuracy %.4f after %d swarm steps (%.0f s)", results["test_accuracy"], swarm_epoch, train_seconds
        )
        return results
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        if dht is not None:
            dht.shutdown()


def startup_summary(
    config: RunConfig, dht: hivemind.DHT, maddrs: list[str], trainer: pl.Trainer, metrics: MetricsServer | None
) -> str:
    """One block at start: who this peer is, what it brings, where its metrics are, how others join."""
    swarm, data, parallel = config.swarm, config.data, config.parallel
    if torch.cuda.is_available() and accelerator(config) != "cpu":
        names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
        hardware = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    else:
        hardware = f"CPU, {torch.get_num_threads()} threads"
    ranks = trainer.world_size
    lines = [
        f"peer {dht.peer_id.to_base58()} "
        + (
            f"joined run {swarm.run_id!r} through {len(swarm.initial_peers)} initial peer(s)"
            if swarm.initial_peers
            else f"started run {swarm.run_id!r}"
        ),
        f"  identity     {swarm.identity_path} (the same peer id after a restart)",
        f"  hardware     {hardware}; {parallel.strategy} over {ranks} local rank(s)",
        f"  contributes  {data.batch_size * ranks} samples per local step ({data.batch_size} x {ranks}), precision "
        f"{config.trainer.precision}, toward {swarm.target_batch_size} per swarm step; {config.model.name} on "
        f"{data.source}, {config.trainer.max_steps} swarm steps",
        f"  metrics for Prometheus at {metrics.url}" if metrics else "  metrics      off (--metrics-port PORT)",
        f"  others join with: {join_hint(maddrs, swarm.run_id)}",
    ]
    return "\n".join(lines)


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
