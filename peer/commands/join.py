"""``vitpeer join``: one peer's whole run, top to bottom — swarm, data, model, Lightning fit, test, results.

A peer is one process, or this host's ``parallel.devices`` local ranks (DDP or FSDP inside the host), which Lightning
starts by running this same command again with ``LOCAL_RANK`` set. Only local rank 0 talks to the swarm: it alone
holds a ``SwarmMembership`` (the DHT node, this peer's records in it, its metrics endpoint) and writes the run's
files; the other ranks follow it (``core.lightning.local_ranks``). What ``join`` shares with ``train`` (the Trainer's
arguments, the callbacks every run records with, ``all_results.json``) is in ``commands.fit``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch.distributed.tensor import DTensor

from vitpeer.monitor.exporter import PeerExporter
from vitpeer.peer.commands.fit import RunStats, run_callbacks, trainer_args, write_results
from vitpeer.peer.core.config import RunConfig
from vitpeer.peer.core.data import VisionDataModule, num_classes
from vitpeer.peer.core.lightning.leave import LeaveOnSignal
from vitpeer.peer.core.lightning.local_ranks import HivemindDDPStrategy, HivemindFSDPStrategy
from vitpeer.peer.core.lightning.strategy import HivemindStrategy, SwarmSteps
from vitpeer.peer.core.model import ImageClassifier, build_model, image_config
from vitpeer.peer.core.model.parallel import device_type, sharder
from vitpeer.peer.core.runtime.http import MetricsServer
from vitpeer.peer.core.runtime.threads import Choice, ThreadShare
from vitpeer.peer.core.swarm.dht import data_order_seed, join_hint, reachable_maddrs, start_dht
from vitpeer.peer.core.swarm.fingerprint import FingerprintKeeper, refuse_mismatch, run_fingerprint
from vitpeer.peer.core.swarm.records import RunFingerprint
from vitpeer.peer.core.swarm.reporter import SwarmReporter

if TYPE_CHECKING:
    from vitpeer.peer.core.lightning import PeerStrategy

log = logging.getLogger(__name__)

ORDER_SEED_ENV = "VITPEER_DATA_ORDER_SEED"
"""The leader's data-order seed, passed to the local ranks Lightning starts (they inherit the environment)."""


def run_join(config: RunConfig, extra_callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any] | None:
    """Join (or start) the swarm, train until ``trainer.max_steps`` swarm steps, test, write results; return them.

    Local ranks 1..N-1 (``LOCAL_RANK`` set by Lightning) follow local rank 0 and touch neither the DHT nor the output
    files; they return None. ``extra_callbacks``: Lightning callbacks added after the run's own (a benchmark's clock,
    a test's fault): the way to extend a run without replacing any of its functions."""
    leave = LeaveOnSignal()
    leave.install()  # from here on, SIGTERM or Ctrl-C means: leave cleanly
    leader = os.environ.get("LOCAL_RANK", "0") == "0"
    out = config.trainer.output_dir
    if config.swarm.identity_path is None:  # the same peer id after a restart: the key lives with the run's files
        config.swarm.identity_path = out / "identity.key"
    if leader:
        out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(config.trainer.seed, workers=True, verbose=False)  # same initial weights on every peer

    threads = ThreadShare(config.trainer.threads)  # this process's share of the cores, before anything computes
    swarm = SwarmMembership(config) if leader else None  # only local rank 0 talks to the swarm
    try:
        classes = num_classes(config.data)
        net = build_model(config.model, classes)
        order_seed = int(os.environ[ORDER_SEED_ENV])  # set by local rank 0 once it is in the swarm
        data = VisionDataModule(config.data, image_config(net, config.model), order_seed=order_seed)
        if swarm is not None:  # before anything reaches the swarm: a peer that trains something else stops here
            swarm.refuse_another_model(net, classes)
        module = ImageClassifier(net, classes, config.optim, config.trainer.max_steps, shard=sharder(config.parallel))

        strategy = make_strategy(config, swarm)
        stats = RunStats()
        reporting = swarm.start_reporting(strategy) if swarm is not None else []
        strategy.leave = leave.requested
        leave.while_leaving.append(strategy.stop_averaging_state)
        callbacks = [*run_callbacks(config), stats, threads, *reporting, leave, *extra_callbacks]
        trainer = pl.Trainer(
            strategy=strategy, accelerator=accelerator(config), callbacks=callbacks, **trainer_args(config)
        )
        if swarm is not None:
            log.info("%s", startup_summary(config, swarm, trainer, threads.choice))
            leave.past_deadline.append(partial(swarm.leave_now, trainer, strategy))

        started = time.monotonic()
        trainer.fit(module, datamodule=data, ckpt_path=config.trainer.resume, weights_only=True)  # never unpickle code
        leave.settled.set()  # the step and the checkpoint are done: no deadline exit while results are written
        train_seconds = time.monotonic() - started
        summary = stats.summary(trainer)  # every rank: it reduces over all of them
        if leave.requested.is_set():  # leaving: the checkpoint is written; testing would keep the volunteer waiting
            if swarm is not None:
                swarm.write_left_early(trainer.global_step, summary)
            return None

        validated = trainer.validate(module, datamodule=data, verbose=False)[0]
        tested = trainer.test(module, datamodule=data, verbose=False)[0]
        if trainer.world_size > 1:  # each rank says what it holds: the ranks must agree, bit for bit
            log.info("local rank %d of %d: parameters sha256 %s", trainer.local_rank, trainer.world_size, digest(net))
        if swarm is None:
            return None
        results = {
            "swarm_epoch": trainer.global_step,
            **summary,
            "train_runtime": round(train_seconds, 2),  # from fit's start: joining and downloading the state count
            "eval_loss": validated["val/loss"],
            "eval_accuracy": validated["val/acc"],
            "test_loss": tested["test/loss"],
            "test_accuracy": tested["test/acc"],
            **swarm.contribution(trainer, strategy),
        }
        write_results(out, results)
        log.info(
            "test accuracy %.4f after %d swarm steps (%.0f s)",
            results["test_accuracy"],
            results["swarm_epoch"],
            train_seconds,
        )
        return results
    finally:
        if swarm is not None:
            swarm.close()


class SwarmMembership:
    """What local rank 0 alone holds: its DHT node, this peer's records in the swarm (signed metrics, the run's
    fingerprint), its Prometheus endpoint, and the run files that say how to reach it.

    Made once the config is checked: it starts the DHT node (joining ``swarm.initial_peers``) and writes
    ``config.yaml`` and ``initial_peers.txt``; ``close`` stops the metrics endpoint and the DHT node."""

    def __init__(self, config: RunConfig):
        self.config, self.out = config, config.trainer.output_dir
        self.dht = start_dht(config.swarm)
        self.exporter = PeerExporter() if config.monitor.port is not None else None  # the strategy's SwarmEvents
        self.fingerprint: RunFingerprint | None = None  # what this peer trains, once its model is built
        self.reporter: SwarmReporter | None = None
        self.metrics_server: MetricsServer | None = None
        try:
            config.write_to(self.out)  # a peer that could not join leaves an earlier run's config.yaml as it was
            self.maddrs = reachable_maddrs(self.dht, config.swarm)
            (self.out / "initial_peers.txt").write_text("\n".join(self.maddrs) + "\n")
            os.environ[ORDER_SEED_ENV] = str(data_order_seed(self.dht, config.trainer.seed))
        except BaseException:
            self.close()
            raise

    def refuse_another_model(self, net: torch.nn.Module, classes: int) -> None:
        """Stop (ConfigError) when the peers of this run id train another model; else remember our fingerprint."""
        self.fingerprint = run_fingerprint(net, self.config, classes)
        refuse_mismatch(self.dht, self.config.swarm.run_id, self.fingerprint)

    def start_reporting(self, strategy: PeerStrategy) -> list[pl.Callback]:
        """The callbacks that keep this peer's records in the DHT (its signed metrics, once per swarm step, and the
        run's fingerprint); with ``monitor.port``, the Prometheus endpoint that serves what the strategy reports."""
        if self.fingerprint is None:
            raise RuntimeError("start_reporting needs the fingerprint: call refuse_another_model first")
        run_id = self.config.swarm.run_id
        self.reporter = SwarmReporter(self.dht, run_id)
        keeper = FingerprintKeeper(self.dht, run_id, self.fingerprint)
        keeper.start()
        monitor = self.config.monitor
        if self.exporter is not None and monitor.port is not None:  # there is an exporter when there is a port
            self.exporter.watch(self.dht.peer_id.to_base58(), run_id, strategy, self.reporter)
            self.metrics_server = MetricsServer(self.exporter.registry, monitor.addr, monitor.port)
        return [self.reporter, keeper]

    def leave_now(self, trainer: pl.Trainer, strategy: SwarmSteps) -> None:
        """Past the leave's deadline, from its thread, while the loop waits in a round: save what the parameters
        are (one device: nothing writes them during the wait) and the results, then say goodbye and stop the DHT.
        The local files first: a goodbye can hang on a DHT that no longer answers, and the process exits
        ``LAST_WORDS`` seconds later whatever is left undone."""
        if trainer.world_size == 1:
            trainer.save_checkpoint(self.out / "checkpoints" / "last.ckpt")
        write_results(self.out, {"swarm_epoch": strategy.swarm_epoch, "left_early": True, "step_finished": False})
        strategy.say_goodbye()
        self.dht.shutdown()  # and its p2p daemon

    def write_left_early(self, swarm_epoch: int, summary: dict[str, Any]) -> None:
        """Left cleanly before ``max_steps``: the results so far, without a test."""
        write_results(self.out, {"swarm_epoch": swarm_epoch, "left_early": True, **summary})
        log.info("left the swarm at swarm step %d; checkpoint in %s", swarm_epoch, self.out / "checkpoints")

    def contribution(self, trainer: pl.Trainer, strategy: SwarmSteps) -> dict[str, Any]:
        """Who this peer is and what it gave the swarm, for the results."""
        if self.reporter is None:
            raise RuntimeError("contribution needs the reporter: call start_reporting first")
        return {
            "peer_id": self.dht.peer_id.to_base58(),
            "local_ranks": trainer.world_size,
            "samples_contributed": self.reporter.samples,
            "local_steps": self.reporter.mini_steps,
            "batches_skipped_nonfinite": strategy.optimizer.skipped_batches,
            "batches_dropped_behind": strategy.optimizer.dropped_behind,
            "swarm_costs": self.reporter.swarm_costs(),  # rounds by outcome, their seconds, bytes sent, waits
        }

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.dht.shutdown()


def make_strategy(config: RunConfig, swarm: SwarmMembership | None) -> PeerStrategy:
    """One device, or this host's ``parallel.devices`` as one peer (DDP or FSDP inside the host). Local rank 0 hands
    the strategy its DHT node and its metrics sink; the other ranks have neither."""
    dht, events = (swarm.dht, swarm.exporter) if swarm is not None else (None, None)
    parallel = config.parallel
    if parallel.num_nodes != 1:
        raise ValueError(f"parallel.num_nodes = {parallel.num_nodes}: a peer is one host; start a peer on each node")
    if parallel.strategy == "fsdp":
        return HivemindFSDPStrategy(config.swarm, dht, devices=parallel.devices, events=events)
    if parallel.strategy == "ddp":
        return HivemindDDPStrategy(config.swarm, dht, events=events)
    return HivemindStrategy(config.swarm, dht, device=pick_device(config.trainer.accelerator), events=events)


def pick_device(accelerator: str) -> torch.device:
    """The device a one-device peer trains on (see ``vitpeer.peer.core.model.parallel.device_type``)."""
    if device_type(accelerator) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def accelerator(config: RunConfig) -> str:
    """Lightning's accelerator name: a single device as ``pick_device`` chose it; DDP ranks on GPUs when there are."""
    if config.parallel.strategy == "single":
        return "gpu" if pick_device(config.trainer.accelerator).type == "cuda" else "cpu"
    return config.trainer.accelerator


def startup_summary(config: RunConfig, swarm: SwarmMembership, trainer: pl.Trainer, threads: Choice) -> str:
    """One block at start: who this peer is, what it brings, where its metrics are, how others join."""
    settings, data, parallel = config.swarm, config.data, config.parallel
    metrics = swarm.metrics_server
    if torch.cuda.is_available() and accelerator(config) != "cpu":
        names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
        hardware = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    else:
        hardware = f"CPU, {threads}"
    ranks = trainer.world_size
    lines = [
        f"peer {swarm.dht.peer_id.to_base58()} "
        + (
            f"joined run {settings.run_id!r} through {len(settings.initial_peers)} initial peer(s)"
            if settings.initial_peers
            else f"started run {settings.run_id!r}"
        ),
        f"  identity     {settings.identity_path} (the same peer id after a restart)",
        f"  hardware     {hardware}; {parallel.strategy} over {ranks} local rank(s)",
        f"  contributes  {data.batch_size * ranks} samples per local step ({data.batch_size} x {ranks}), precision "
        f"{config.trainer.precision}, toward {settings.target_batch_size} per swarm step; {config.model.name} on "
        f"{data.source}, {config.trainer.max_steps} swarm steps",
        f"  metrics for Prometheus at {metrics.url}" if metrics else "  metrics      off (--metrics-port PORT)",
        f"  others join with: {join_hint(swarm.maddrs, settings.run_id, settings.client_mode, settings.initial_peers)}",
    ]
    return "\n".join(lines)


def digest(net: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in order: equal digests, identical replicas. Sharded (FSDP)
    tensors are gathered whole first, which every rank does together."""
    hasher = hashlib.sha256()
    for tensor in net.state_dict().values():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        hasher.update(full.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]
