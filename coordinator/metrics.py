"""Swarm numbers from the peers' signed records: who is alive, the swarm's loss and throughput, and their history."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hivemind
from hivemind.utils import get_dht_time
from pydantic.v1 import ValidationError

from peer.report import PeerReport, metrics_key

log = logging.getLogger(__name__)


def read_reports(dht: hivemind.DHT, run_id: str) -> list[PeerReport]:
    """The alive peers' newest reports (records expire on their own), one per peer id."""
    found = dht.get(metrics_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    newest: dict[str, PeerReport] = {}
    for item in found.value.values():
        if item.value is None:  # a peer's goodbye
            continue
        try:
            report = PeerReport.parse_obj(item.value)
        except (ValidationError, TypeError) as err:  # the DHT validators let none through; stay safe anyway
            log.warning("ignoring a malformed metrics record: %s", err)
            continue
        if report.peer_id not in newest or report.time > newest[report.peer_id].time:
            newest[report.peer_id] = report  # a restarted peer signs with a new key: keep its newest record
    return sorted(newest.values(), key=lambda report: report.peer_id)


def aggregate(reports: list[PeerReport]) -> dict[str, Any]:
    """Swarm step, sample-weighted loss, total samples/s and each alive peer's last report."""
    now = get_dht_time()
    weighted = [(r.loss, r.window_samples) for r in reports if r.loss is not None and r.window_samples > 0]
    samples = sum(n for _, n in weighted)
    return {
        "swarm_epoch": max((r.step for r in reports), default=None),
        "loss": sum(loss * n for loss, n in weighted) / samples if samples else None,
        "samples_per_second": sum(r.samples_per_second for r in reports),
        "alive_peers": len(reports),
        "peers": [{**r.dict(), "seconds_since_report": round(now - r.time, 1)} for r in reports],
    }


class History:
    """``metrics.jsonl``: one line per swarm step the coordinator saw, appended (survives restarts)."""

    def __init__(self, path: Path):
        self.path, self.last_epoch = path, None

    def append(self, swarm: dict[str, Any]) -> bool:
        if swarm["swarm_epoch"] is None or swarm["swarm_epoch"] == self.last_epoch:
            return False
        self.last_epoch = swarm["swarm_epoch"]
        line = {key: swarm[key] for key in ("swarm_epoch", "loss", "samples_per_second", "alive_peers")}
        line["time"] = round(get_dht_time(), 3)
        line["peer_steps"] = {peer["peer_id"]: peer["step"] for peer in swarm["peers"]}
        with self.path.open("a") as sink:
            sink.write(json.dumps(line) + "\n")
        return True
