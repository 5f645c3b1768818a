"""Swarm-wide series from the peers' signed DHT records: served by the coordinator and by ``vitpeer monitor``.

``SwarmCollector`` reads a status dict (the coordinator's ``/status`` shape) at scrape time::

    vitpeer_swarm_alive_peers, vitpeer_swarm_epoch, vitpeer_swarm_samples_per_second, vitpeer_swarm_loss
    vitpeer_swarm_peer_info{signer,peer_id,version,hardware,algorithm} 1
    vitpeer_swarm_peer_epoch / _samples_per_second / _loss / _samples_total / _report_age_seconds {signer,peer_id}
    vitpeer_swarm_peer_rounds_total / _averaged_rounds_total / _sent_bytes_total / _averaging_seconds_total /
        _wait_seconds_total / _compute_seconds_total {signer,peer_id}
                                               what the swarm cost each peer (``core.averaging.events.SwarmTotals``):
                                               its rounds, estimated bytes sent, averaging time, time blocked on the
                                               swarm and computing, as its own exporter counts them
    vitpeer_rejected_records_total{reason}     signature | schema: forged, malformed or implausible records
                                               refused (out-of-bounds values count as schema)

and, when the status has checkpoints (the coordinator's)::

    vitpeer_checkpoint_epoch, vitpeer_checkpoint_timestamp_seconds, vitpeer_checkpoint_val_accuracy_ratio
    vitpeer_checkpoint_failures_total{stage}   download | evaluate | checkpoint

Per-peer series come from the records, so organisers see every volunteer without scraping them (most are behind
NAT). A series is a signer's (``signer``: the id of the key that signed the record, ``core.swarm.records.signer_id``);
its
``peer_id`` is what the record claims, a label anyone can write: two keys claiming one ``peer_id`` are two series, and
neither replaces the other. ``signer`` has one value per live peer (an honest peer's is its peer id: it signs with
its identity key, the same after a restart). The costs stay per peer: a sum over the live peers would drop when one
leaves, which a counter must not do; a dashboard sums their rates. ``/status`` has the run's sums and ratios.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CHECKPOINT_STAGES = ("download", "evaluate", "checkpoint")


class SwarmCollector(Collector):
    """Series of ``status()``: keys swarm_epoch, loss, samples_per_second, alive_peers, peers, rejected_records,
    and optionally checkpoints and errors."""

    def __init__(self, status: Callable[[], dict[str, Any]]):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        yield GaugeMetricFamily("vitpeer_swarm_alive_peers", "Peers with a live metrics record", status["alive_peers"])
        yield GaugeMetricFamily(
            "vitpeer_swarm_samples_per_second",
            "Sum of the alive peers' samples per second",
            status["samples_per_second"],
        )
        if status["swarm_epoch"] is not None:
            yield GaugeMetricFamily("vitpeer_swarm_epoch", "Newest swarm step among alive peers", status["swarm_epoch"])
        if status["loss"] is not None:
            yield GaugeMetricFamily(
                "vitpeer_swarm_loss", "Sample-weighted training loss of alive peers", status["loss"]
            )
        yield from _peer_families(status["peers"])
        rejected = CounterMetricFamily(
            "vitpeer_rejected_records", "DHT records this node refused, by reason", labels=["reason"]
        )
        for reason in ("signature", "schema"):
            rejected.add_metric([reason], status["rejected_records"].get(reason, 0))
        yield rejected
        if "checkpoints" in status:
            yield from _checkpoint_families(status["checkpoints"]["newest"], status.get("errors", {}))


COSTS = {  # counters per peer, named after the record's fields: vitpeer_swarm_peer_<field>_total
    "rounds": "Swarm steps the peer ended with an averaging round, any outcome",
    "averaged_rounds": "Rounds in which the peer averaged with others",
    "sent_bytes": "Estimated bytes the peer sent in averaged rounds",
    "averaging_seconds": "Seconds of the peer's averaged rounds, hand-off to end",
    "wait_seconds": "Seconds the peer's training thread was blocked on the swarm",
    "compute_seconds": "Seconds the peer computed local steps, less the time blocked inside them",
}


def _peer_families(peers: list[dict[str, Any]]) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "vitpeer_swarm_peer_info",
        "A peer with a live record",
        labels=["signer", "peer_id", "version", "hardware", "algorithm"],
    )
    ids = ["signer", "peer_id"]  # the key that signed the record, and the peer id it claims
    gauges = {
        "epoch": ("step", "Swarm step the peer reported"),
        "samples_per_second": ("samples_per_second", "The peer's samples per second"),
        "loss": ("loss", "The peer's mean training loss over its last reporting window"),
        "report_age_seconds": ("seconds_since_report", "Seconds since the peer's newest record"),
    }
    families = {
        name: GaugeMetricFamily(f"vitpeer_swarm_peer_{name}", text, labels=ids) for name, (_, text) in gauges.items()
    }
    samples = CounterMetricFamily("vitpeer_swarm_peer_samples", "Samples the peer contributed", labels=ids)
    costs = {key: CounterMetricFamily(f"vitpeer_swarm_peer_{key}", text, labels=ids) for key, text in COSTS.items()}
    for peer in peers:
        who = [peer.get("signer") or "", peer["peer_id"]]  # no signer: a report built by hand, never signed
        info.add_metric([*who, peer["version"], peer["hardware"], peer["algorithm"] or "unknown"], 1)
        samples.add_metric(who, peer["samples"])
        for name, (key, _) in gauges.items():
            if peer.get(key) is not None:
                families[name].add_metric(who, peer[key])
        for key, family in costs.items():
            family.add_metric(who, peer[key])
    yield info
    yield samples
    yield from families.values()
    yield from costs.values()


def _checkpoint_families(newest: dict[str, Any] | None, errors: dict[str, int]) -> Iterator[Metric]:
    if newest is not None:
        yield GaugeMetricFamily(
            "vitpeer_checkpoint_epoch", "Swarm step of the newest complete checkpoint", newest["swarm_epoch"]
        )
        yield GaugeMetricFamily(
            "vitpeer_checkpoint_timestamp_seconds", "Unix time the newest complete checkpoint was taken", newest["time"]
        )
        if newest.get("val_accuracy") is not None:
            yield GaugeMetricFamily(
                "vitpeer_checkpoint_val_accuracy_ratio",
                "Validation accuracy of the newest checkpoint",
                newest["val_accuracy"],
            )
    failures = CounterMetricFamily(
        "vitpeer_checkpoint_failures", "Checkpoint attempts that failed, by stage", labels=["stage"]
    )
    for stage in CHECKPOINT_STAGES:
        failures.add_metric([stage], errors.get(stage, 0))
    yield failures
