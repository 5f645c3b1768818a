"""``vitpeer coordinator``: the whole loop, top to bottom.

Start: DHT node with a persistent identity at a fixed port -> the run's state, in the protocol of its algorithm
(``open_swarm_state``) -> reload the newest complete checkpoint, if any -> keep ``best/`` only if it is the export of
the best evaluated, intact checkpoint (``publish_best``) -> HTTP API. Then, every ``poll_interval``
seconds until SIGTERM or Ctrl-C: read the peers' signed metrics records (one row per signing key, implausible ones
skipped: ``core.swarm.records.read_reports``), append the history, and when a checkpoint is due, download the swarm's
state, write it, evaluate it, commit it and export the best. One failure (a download, an evaluation, a write) is
logged and counted in ``/status`` and tried again at the next interval; it never ends the run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import signal
import threading
import time
from collections import Counter
from typing import Any

from hivemind.utils import get_dht_time
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from torch import nn

from vitpeer.coordinator.api import BEST_FILES, ApiServer, page_routes
from vitpeer.coordinator.checkpoints import CheckpointStore, export_for_timm, exported, withdraw_export
from vitpeer.coordinator.config import CoordinatorConfig
from vitpeer.coordinator.state import evaluate, open_swarm_state
from vitpeer.monitor.exporter import InfoCollector, host_registry
from vitpeer.monitor.swarm import SwarmCollector
from vitpeer.peer.core.config import RunConfig
from vitpeer.peer.core.data import VisionDataModule
from vitpeer.peer.core.model import image_config
from vitpeer.peer.core.swarm.dht import default_route_ip, reachable_maddrs, start_dht
from vitpeer.peer.core.swarm.fingerprint import FingerprintKeeper, refuse_mismatch, run_fingerprint
from vitpeer.peer.core.swarm.records import MetricsLog, aggregate, read_reports, rejected_records

log = logging.getLogger(__name__)


def config_hash(config: RunConfig) -> str:
    """Fingerprint of what all peers share (model, data, optimizer, swarm rules): equal hash, same run."""
    return hashlib.sha256(config.for_peers().to_yaml().encode()).hexdigest()[:16]


def http_url(coord: CoordinatorConfig, port: int) -> str:
    host = coord.http_host
    if host in ("0.0.0.0", ""):
        host = coord.announce_ip or default_route_ip() or "127.0.0.1"
    return f"http://{host}:{port}"


class Coordinator:
    """The coordinator's state between polls; ``run_coordinator`` drives it."""

    def __init__(self, config: RunConfig, coord: CoordinatorConfig):
        self.config, self.coord = config, coord
        self.started = time.monotonic()
        self.errors: Counter[str] = Counter()
        self.swarm: dict[str, Any] = aggregate([])
        self.rejected: dict[str, int] = {}
        self.last_checkpoint_time = time.monotonic()
        self.lock = threading.Lock()
        self.history = MetricsLog(coord.state_dir / "metrics.jsonl")
        self.store = CheckpointStore(coord.state_dir / "checkpoints", coord.keep_last)
        self.hash = config_hash(config)
        self.url = ""  # the HTTP API's address, once it listens
        self.evaluations = coord.state_dir / "evaluations.jsonl"  # the page's accuracy curve: one line a checkpoint

    # --- start ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        swarm = self.coord.swarm(self.config.swarm)
        self.dht = start_dht(swarm)
        self.maddrs = reachable_maddrs(self.dht, swarm)
        (self.coord.state_dir / "initial_peers.txt").write_text("\n".join(self.maddrs) + "\n")
        self.state = open_swarm_state(self.config, self.dht)
        self.store.remove_partial()
        restored = self.store.load_newest()
        if restored is not None:
            sidecar, state = restored
            self.state.load_state_dict(state)
            log.info(
                "resumed from checkpoint %s (swarm step %d); serving it to joining peers",
                sidecar["file"],
                self.state.epoch,
            )
        try:
            self.publish_best()  # what the last run left in best/ is served only if it is still the best
        except Exception as err:  # logged, counted; the next checkpoint tries again
            self.errors["export"] += 1
            log.warning("publishing the best checkpoint failed (%s: %s)", type(err).__name__, err)
        self.registry = host_registry()  # /metrics: this host, the swarm's records, checkpoints
        run = self.config.swarm
        self.registry.register(InfoCollector(self.dht.peer_id.to_base58(), run.run_id, "coordinator", run.algorithm))
        self.registry.register(SwarmCollector(self.status))
        images = image_config(self.state.net, self.config.model)
        fingerprint = run_fingerprint(self.state.net, self.config, self.state.num_classes, settings=False)
        refuse_mismatch(self.dht, self.config.swarm.run_id, fingerprint)  # peers of this run id train something else
        self.keeper = FingerprintKeeper(self.dht, self.config.swarm.run_id, fingerprint)
        self.keeper.start()  # newcomers with another model are refused even while no volunteer trains
        data = VisionDataModule(self.config.data, images, order_seed=0)
        data.setup("validate")
        self.val_loader = data.val_dataloader()

    # --- every poll -----------------------------------------------------------------------------------------------

    def poll(self) -> None:
        swarm = aggregate(read_reports(self.dht, self.config.swarm.run_id), self.config.trainer.max_steps)
        rejected = rejected_records(self.dht)
        if sum(rejected.values()) > sum(self.rejected.values()):
            log.warning("refused forged, malformed or implausible DHT records so far: %s", rejected)
        with self.lock:
            self.swarm, self.rejected = swarm, rejected
        if self.history.append(swarm):
            loss = f"{swarm['loss']:.4f}" if swarm["loss"] is not None else "-"
            log.info(
                "swarm step %d | peers %d | loss %s | %.0f samples/s",
                swarm["swarm_epoch"],
                swarm["alive_peers"],
                loss,
                swarm["samples_per_second"],
            )
        if self.checkpoint_due(swarm["swarm_epoch"]):
            try:
                self.checkpoint()
            except Exception as err:  # logged, counted, retried at the next interval
                self.errors["checkpoint"] += 1
                log.warning("checkpoint failed (%s: %s); trying again at the next interval", type(err).__name__, err)
            self.last_checkpoint_time = time.monotonic()

    def checkpoint_due(self, swarm_epoch: int | None) -> bool:
        if swarm_epoch is None or swarm_epoch <= self.state.epoch:
            return False
        every, minutes = self.coord.checkpoint_every_steps, self.coord.checkpoint_every_minutes
        by_steps = every > 0 and swarm_epoch >= self.state.epoch + every
        by_time = minutes > 0 and time.monotonic() - self.last_checkpoint_time >= minutes * 60
        return by_steps or by_time

    def checkpoint(self) -> None:
        """Download the swarm's state, write it, evaluate it, commit it; export it when it is the best."""
        started = time.monotonic()
        if not self.state.download(self.coord.download_timeout):
            self.errors["download"] += 1
            log.warning("no peer sent a newer state than step %d; trying again at the next interval", self.state.epoch)
            return
        downloaded = time.monotonic() - started
        written = self.store.save(self.state.state_dict())
        try:
            scores = evaluate(self.state.net, self.val_loader, self.coord.eval_batches)
        except Exception as err:
            self.errors["evaluate"] += 1
            log.warning("evaluating step %d failed (%s: %s)", self.state.epoch, type(err).__name__, err)
            scores = {"val_loss": None, "val_accuracy": None, "eval_error": f"{type(err).__name__}: {err}"}
        sidecar = self.store.commit(
            written,
            {
                "swarm_epoch": self.state.epoch,
                "samples_seen": self.state.epoch * self.config.swarm.target_batch_size,
                "peers": [peer["peer_id"] for peer in self.swarm["peers"]],
                "config_hash": self.hash,
                "time": round(get_dht_time(), 3),
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "download_seconds": round(downloaded, 3),
                **scores,
            },
        )
        evaluation = {key: sidecar.get(key) for key in ("swarm_epoch", "val_accuracy", "val_loss", "time")}
        with self.evaluations.open("a") as sink:
            sink.write(json.dumps(evaluation) + "\n")
        accuracy = sidecar.get("val_accuracy")
        log.info(
            "checkpoint %s: swarm step %d, val accuracy %s, %.1f MB written in %.2f s",
            sidecar["file"],
            sidecar["swarm_epoch"],
            f"{accuracy:.4f}" if accuracy is not None else "-",
            sidecar["bytes"] / 1e6,
            sidecar["write_seconds"],
        )
        self.publish_best(fresh=sidecar)

    def publish_best(self, fresh: dict[str, Any] | None = None) -> None:
        """Make ``best/`` the export of ``store.best()`` (the evaluated checkpoint with the highest accuracy whose bytes
        match their sha256), or serve no best when there is none: after a restart, a crash or a failed export, best/
        never holds a model that was not evaluated, a damaged one, or one that is no longer the best. ``fresh`` is the
        checkpoint just written from ``state``; any other is read back from disk."""
        directory = self.coord.state_dir / "best"
        shutil.rmtree(directory.with_name("best.old"), ignore_errors=True)  # left by a crash of an older version
        best, results = self.store.best(), exported(directory)
        if best is None:
            if directory.exists():
                log.warning("withdrawing %s: no evaluated checkpoint whose bytes match their sha256 is left", directory)
                withdraw_export(directory)
            return
        served = [directory / name for name, _ in BEST_FILES.values()]
        if results is not None and all(path.is_file() for path in served):
            claims = (results.get("checkpoint"), results.get("swarm_epoch"), results.get("eval_accuracy"))
            if claims == (best["file"], best["swarm_epoch"], best["val_accuracy"]):
                return
        if fresh is not None and fresh["file"] == best["file"]:
            net = self.state.net
        else:
            state = self.store.load(best)
            if state is None:  # damaged since it was hashed: now known so, and never the best again
                return self.publish_best(fresh)
            net = copy.deepcopy(self.state.net)
            net.load_state_dict(state["model"])
            log.info("exporting %s (val accuracy %.4f) to %s", best["file"], best["val_accuracy"], directory)
        try:
            self.export(best, net)
        except BaseException:
            with contextlib.suppress(OSError):  # the export's own error is the one to report
                withdraw_export(directory)  # a half-replaced best/ is not served
            raise

    def export(self, sidecar: dict[str, Any], net: nn.Module) -> None:
        model = self.config.model
        model_args = {**model.kwargs, "num_classes": self.state.num_classes}
        if model.img_size is not None:
            model_args["img_size"] = model.img_size
        results = {
            "swarm_epoch": sidecar["swarm_epoch"],
            "eval_accuracy": sidecar["val_accuracy"],
            "eval_loss": sidecar["val_loss"],
            "eval_samples": sidecar["val_samples"],
            "train_samples": sidecar["samples_seen"],
            "checkpoint": sidecar["file"],
            "config_hash": sidecar["config_hash"],
        }
        export_for_timm(net, model_args, results, self.coord.state_dir / "best")

    # --- what the API serves --------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self.lock:
            swarm, rejected, errors = dict(self.swarm), dict(self.rejected), dict(self.errors)
        swarm.pop("algorithm")  # as the records say; the run's own is below (the peers' must match: fingerprint)
        return {
            "run_id": self.config.swarm.run_id,
            "algorithm": self.config.swarm.algorithm,
            "config_hash": self.hash,
            "max_steps": self.config.trainer.max_steps,  # as the run's config says (/config); a peer may stop sooner
            "url": self.url,
            **swarm,
            "state_epoch": self.state.epoch,
            "checkpoints": {"newest": self.store.newest(), "best": self.store.best()},
            "rejected_records": rejected,
            "errors": errors,
            "uptime_seconds": round(time.monotonic() - self.started, 1),
        }

    def routes(self) -> dict[str, Any]:
        return {
            "/initial-peers": lambda: ("text/plain", "\n".join(self.maddrs) + "\n"),
            "/status": lambda: ("application/json", json.dumps(self.status(), indent=2) + "\n"),
            "/config": lambda: ("application/yaml", self.config.for_peers().to_yaml()),
            "/metrics": lambda: (CONTENT_TYPE_LATEST, generate_latest(self.registry).decode()),
            **page_routes(self.coord.state_dir, self.store.complete),  # /, /history.json, /best/...
        }

    def shutdown(self) -> None:
        if hasattr(self, "keeper"):
            self.keeper.stop()
        if hasattr(self, "state"):
            self.state.shutdown()
        if hasattr(self, "dht"):
            self.dht.shutdown()


def run_coordinator(config: RunConfig, coord: CoordinatorConfig) -> None:
    """Run until SIGTERM or Ctrl-C."""
    coord.state_dir.mkdir(parents=True, exist_ok=True)
    config.save(coord.state_dir / "config.yaml")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    coordinator = Coordinator(config, coord)
    api = None
    try:
        coordinator.start()
        api = ApiServer(coord.http_host, coord.http_port, coordinator.routes(), names=tuple(coord.http_names))
        url = coordinator.url = http_url(coord, api.port)
        log.info("coordinator of run %r; initial peers: %s", config.swarm.run_id, " ".join(coordinator.maddrs))
        log.info("HTTP API at %s (/status, /initial-peers, /config, /metrics)", url)
        log.info("live page at %s/", url)
        log.info("volunteers join with: vitpeer join --coordinator %s", url)
        if coord.http_host.startswith("127.") or coord.http_host in ("localhost", "::1"):
            log.warning("the HTTP API answers on this host only; pass --http-host 0.0.0.0 to let volunteers reach it")
        while not stop.is_set():
            try:
                coordinator.poll()
            except Exception as err:  # e.g. the DHT did not answer in time: the next poll tries again
                coordinator.errors["poll"] += 1
                log.warning("poll failed (%s: %s)", type(err).__name__, err)
            stop.wait(coord.poll_interval)
        log.info("stopping (signal received)")
    finally:
        if api is not None:
            api.shutdown()
        coordinator.shutdown()
