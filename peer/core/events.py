"""SwarmEvents: what a peer's swarm optimizer reports as it happens, for metrics sinks.

``core.hivemind_adapters.SwarmOptimizer`` calls these hooks from inside hivemind's step (gradient rounds, state
downloads, batches kept out of the swarm); ``monitor.exporter.PeerExporter`` counts them for Prometheus. Pass a sink
to the strategy (``HivemindStrategy(..., events=sink)``); without one the base class below ignores everything.
Calls may come from hivemind's background threads: a sink must be thread-safe and return quickly.
"""

from __future__ import annotations


class SwarmEvents:
    """What the strategy reports as it happens, for metrics sinks; this base ignores it.

    ``monitor.exporter.PeerExporter`` counts these for Prometheus. Calls may come from hivemind's background threads.
    """

    def averaging_round(self, outcome: str, seconds: float | None) -> None:
        """A gradient averaging round ended: ``averaged`` (with others), ``failed`` (error or timeout: this peer
        stepped with its own gradients) or ``alone`` (no other peer: nothing to average). ``seconds``: from handing
        the gradients to the round until it ended, None when no round ran."""

    def state_download(self, outcome: str, seconds: float) -> None:
        """A download of the swarm's state ended: ``loaded`` (moved this peer to a newer swarm step), ``current``
        (no peer had a newer one) or ``failed`` (given up at ``load_state_timeout``)."""

    def batch_skipped(self, reason: str) -> None:
        """A local batch's gradients were kept out of the swarm: ``nonfinite`` (NaN or Inf in them)."""
