"""A training peer's Prometheus exporter (``vitpeer join --metrics-port P``).

Series, besides the host's (``vitpeer.monitor.host``) and prometheus_client's standard ``process_*``::

    vitpeer_peer_info{peer_id,run_id,version,strategy,algorithm} 1
    vitpeer_samples_total                      samples this peer trained on (forward + backward)
    vitpeer_local_steps_total                  local steps (micro-batches)
    vitpeer_samples_per_second                 hivemind's moving average of this peer's throughput
    vitpeer_loss                               mean training loss per sample over the last swarm step
    vitpeer_swarm_epoch                        the swarm step (hivemind epoch) this peer is at
    vitpeer_swarm_peers                        swarm size this peer sees
    vitpeer_swarm_samples_accumulated          samples the swarm gathered toward the next step
    vitpeer_target_batch_size                  samples per swarm step
    vitpeer_averaging_rounds_total{outcome}    averaged | failed | rejected | alone (``core.averaging.events``)
    vitpeer_averaging_round_duration_seconds   histogram: (pseudo-)gradients handed over -> round finished
    vitpeer_averaging_sent_bytes_total         estimated bytes sent in averaged rounds: 2 (N - 1) / N of the
                                               tensors as compressed, per round among N peers (state rounds,
                                               diloco's exact syncs and state downloads not counted)
    vitpeer_swarm_wait_seconds_total           the training thread blocked on the swarm (diloco: a round still in
                                               flight when the next is due, syncs, downloads; gradient: each step's
                                               gradient all-reduce unless --overlap, downloads)
    vitpeer_compute_seconds_total              local steps' wall time less the time blocked inside them
    vitpeer_state_downloads_total{outcome}     loaded | current | failed; refused: a state a peer sent that failed
                                               the check (shapes, dtypes, NaN/Inf, step too far ahead), not taken
    vitpeer_batches_skipped_total{reason}      nonfinite: local batches whose NaN/Inf gradients were not sent;
                                               behind: batches dropped because the swarm had moved on (gradient)

The training numbers are read from the trainer at scrape time (nothing is added to the training step); rounds and
downloads are counted as the strategy reports them. The bytes, wait and compute totals are the ones the peer
publishes in its DHT record (``core.averaging.events.SwarmTotals``, ``core.swarm.reporter``), so the coordinator shows
the same.
Bytes per averaged round: ``rate(vitpeer_averaging_sent_bytes_total) / rate(vitpeer_averaging_rounds_total{outcome=
"averaged"})``; share of time blocked: ``rate(wait) / (rate(wait) + rate(compute))``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vitpeer.monitor.host import HostCollector, Nvml
from vitpeer.peer.core.averaging.events import SwarmEvents
from vitpeer.peer.core.swarm.records import vitpeer_version

if TYPE_CHECKING:
    from vitpeer.peer.core.lightning import PeerStrategy
    from vitpeer.peer.core.swarm.reporter import SwarmReporter

ROUND_OUTCOMES = ("averaged", "failed", "rejected", "alone")
DOWNLOAD_OUTCOMES = ("loaded", "current", "failed", "refused")
SKIP_REASONS = ("nonfinite", "behind")
ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Seconds, from a loopback round of a small model (a fraction of a second) to a ViT-B round over the internet (tens
of seconds)."""


class InfoCollector(Collector):
    """``vitpeer_peer_info{peer_id,run_id,version,strategy,algorithm} 1``: joins this process's series to its peer id;
    ``algorithm`` is the run's ``swarm.algorithm`` (``diloco`` or ``gradient``)."""

    def __init__(self, peer_id: str, run_id: str, strategy: str, algorithm: str):
        self.labels = [peer_id, run_id, vitpeer_version(), strategy, algorithm]

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "vitpeer_peer_info",
            "This process in the swarm",
            labels=["peer_id", "run_id", "version", "strategy", "algorithm"],
        )
        info.add_metric(self.labels, 1)
        yield info


def host_registry() -> CollectorRegistry:
    """A registry with this host's series: GPUs (NVML), process CPU share, standard process_* series."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(HostCollector(Nvml.start()))
    return registry


class PeerExporter(SwarmEvents):
    """Counts the strategy's events and, once ``watch`` is called, reads the training numbers at every scrape."""

    def __init__(self):
        super().__init__()  # the totals the reporter publishes, and the byte and time counters below
        self.registry = host_registry()
        self.rounds = Counter(
            "vitpeer_averaging_rounds", "Gradient averaging rounds by outcome", ["outcome"], registry=self.registry
        )
        self.round_seconds = Histogram(
            "vitpeer_averaging_round_duration_seconds",
            "Seconds from handing this peer's gradients to a round until the round ended",
            buckets=ROUND_BUCKETS,
            registry=self.registry,
        )
        self.downloads = Counter(
            "vitpeer_state_downloads", "Downloads of the swarm's state by outcome", ["outcome"], registry=self.registry
        )
        self.skipped = Counter(
            "vitpeer_batches_skipped",
            "Local batches kept out of the swarm, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in SKIP_REASONS:
            self.skipped.labels(reason)
        for outcome in ROUND_OUTCOMES:  # every outcome exists from the start at 0, so rate() sees the first one
            self.rounds.labels(outcome)
        for outcome in DOWNLOAD_OUTCOMES:
            self.downloads.labels(outcome)

    def averaging_round(self, outcome: str, seconds: float | None, sent_bytes: int = 0) -> None:
        super().averaging_round(outcome, seconds, sent_bytes)
        self.rounds.labels(outcome).inc()
        if seconds is not None:
            self.round_seconds.observe(seconds)

    def state_download(self, outcome: str, seconds: float) -> None:
        super().state_download(outcome, seconds)
        self.downloads.labels(outcome).inc()

    def batch_skipped(self, reason: str) -> None:
        super().batch_skipped(reason)
        self.skipped.labels(reason).inc()

    def watch(self, peer_id: str, run_id: str, strategy: PeerStrategy, reporter: SwarmReporter) -> None:
        self.registry.register(InfoCollector(peer_id, run_id, strategy.strategy_name, strategy.swarm.algorithm))
        self.registry.register(TrainingCollector(strategy, reporter))


class TrainingCollector(Collector):
    """This peer's training numbers, read from the strategy's optimizer and the DHT reporter when scraped."""

    def __init__(self, strategy: PeerStrategy, reporter: SwarmReporter):
        self.strategy, self.reporter = strategy, reporter

    def collect(self) -> Iterator[Metric]:
        reporter = self.reporter
        yield CounterMetricFamily("vitpeer_samples", "Samples this peer trained on", value=reporter.samples)
        yield CounterMetricFamily("vitpeer_local_steps", "Local steps (micro-batches)", value=reporter.mini_steps)
        costs = reporter.swarm_costs()  # what its next DHT record will say
        yield CounterMetricFamily(
            "vitpeer_averaging_sent_bytes",
            "Estimated bytes this peer sent in averaged rounds: 2 (N - 1) / N of its tensors as compressed, per round",
            value=costs["sent_bytes"],
        )
        yield CounterMetricFamily(
            "vitpeer_swarm_wait_seconds",
            "Seconds the training thread was blocked on the swarm (rounds, syncs, state downloads)",
            value=costs["wait_seconds"],
        )
        yield CounterMetricFamily(
            "vitpeer_compute_seconds",
            "Seconds of local steps (forward, backward, optimizer) less the time blocked on the swarm inside them",
            value=costs["compute_seconds"],
        )
        if reporter.last is not None and reporter.last["loss"] is not None:
            yield GaugeMetricFamily(
                "vitpeer_loss", "Mean training loss per sample over the last swarm step", value=reporter.last["loss"]
            )
        opt = self.strategy.peer_optimizer
        if opt is None:
            return  # before fit: the swarm optimizer does not exist yet
        progress = opt.tracker.global_progress
        gauges = {
            "samples_per_second": ("This peer's samples per second", opt.local_progress.samples_per_second),
            "swarm_epoch": ("The swarm step (hivemind epoch) this peer is at", opt.local_epoch),
            "swarm_peers": ("Peers in the swarm as this peer sees it", max(1, progress.num_peers)),
            "swarm_samples_accumulated": (
                "Samples the swarm gathered toward the next step",
                progress.samples_accumulated,
            ),
            "target_batch_size": ("Samples per swarm step", progress.target_batch_size),
        }
        for name, (help_text, value) in gauges.items():
            yield GaugeMetricFamily(f"vitpeer_{name}", help_text, value=float(value))
