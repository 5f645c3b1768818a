"""``vitpeer monitor``: a swarm exporter without the coordinator, top to bottom.

A DHT node in client mode (it serves nothing to the swarm) with vitpeer's record validators joins through the given
initial peers, reads the peers' signed metrics records every ``poll_interval`` seconds, and serves them as the
swarm series of ``vitpeer.monitor.swarm`` until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from prometheus_client import CollectorRegistry

from vitpeer.monitor.swarm import SwarmCollector
from vitpeer.peer.core.config import SwarmConfig
from vitpeer.peer.core.runtime.http import MetricsServer
from vitpeer.peer.core.swarm.dht import start_dht
from vitpeer.peer.core.swarm.records import aggregate, read_reports, rejected_records

log = logging.getLogger(__name__)


class SwarmWatch:
    """The newest swarm status read from the DHT (the coordinator's /status shape, without checkpoints)."""

    def __init__(self, dht, run_id: str):
        self.dht, self.run_id, self.lock = dht, run_id, threading.Lock()
        self.current: dict[str, Any] = {**aggregate([]), "rejected_records": {}}

    def poll(self) -> dict[str, Any]:
        status = {**aggregate(read_reports(self.dht, self.run_id)), "rejected_records": rejected_records(self.dht)}
        with self.lock:
            self.current = status
        return status

    def status(self) -> dict[str, Any]:
        with self.lock:
            return self.current


def run_monitor(run_id: str, initial_peers: list[str], addr: str, port: int, poll_interval: float = 5.0) -> None:
    """Serve the swarm's series on ``http://addr:port/metrics`` until SIGTERM or Ctrl-C."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    swarm = SwarmConfig(
        run_id=run_id, initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=True
    )
    dht = start_dht(swarm)
    server = None
    try:
        watch = SwarmWatch(dht, run_id)
        registry = CollectorRegistry()
        registry.register(SwarmCollector(watch.status))
        server = MetricsServer(registry, addr, port)
        log.info("watching swarm %r; metrics for Prometheus at %s", run_id, server.url)
        while not stop.is_set():
            try:
                status = watch.poll()
                log.debug("swarm step %s, %d alive peers", status["swarm_epoch"], status["alive_peers"])
            except Exception as err:  # the DHT did not answer in time: the next poll tries again
                log.warning("reading the swarm's records failed (%s: %s)", type(err).__name__, err)
            stop.wait(poll_interval)
        log.info("stopping (signal received)")
    finally:
        if server is not None:
            server.shutdown()
        dht.shutdown()
