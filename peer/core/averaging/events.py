"""SwarmEvents: what a peer's swarm optimizer reports as it happens, for metrics sinks, and the totals it keeps.

``core.averaging.hivemind_optimizer.SwarmOptimizer`` (``gradient``) and ``core.algorithms.diloco.DiLoCoOptimizer``
(``diloco``) call these
hooks (averaging rounds with the bytes they sent, time the training thread spent blocked on the swarm, state
downloads, batches kept out of the swarm); ``monitor.exporter.PeerExporter`` counts them for Prometheus. Pass a sink
to the strategy (``HivemindStrategy(..., events=sink)``); without one the strategy uses this base class, which keeps
only ``SwarmTotals``: the running totals ``core.swarm.reporter`` publishes in the peer's DHT record whether or not a
Prometheus endpoint runs. A sink that overrides a hook calls ``super()`` so the totals stay right.
Calls may come from hivemind's background threads: a sink must be thread-safe and return quickly.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass


def allreduce_bytes_sent(wire_bytes: float, group_size: int) -> int:
    """Estimated bytes one peer sends in an all-reduce of ``wire_bytes`` (its tensors as compressed on the wire)
    among ``group_size`` peers: hivemind's butterfly all-reduce sends the N - 1 parts other peers reduce
    (scatter), then its reduced part to those N - 1 peers (gather), each 1/N of the tensors: 2 (N - 1) / N. Protocol
    overhead (protobuf framing, matchmaking, TLS) is not counted."""
    if group_size <= 1:
        return 0
    return int(2 * (group_size - 1) / group_size * wire_bytes)


@dataclass
class SwarmTotals:
    """What the swarm cost this peer since it started: running totals, read by ``core.swarm.reporter``."""

    rounds: int = 0
    """Swarm steps this peer ended with a round, whatever its outcome (averaged, failed, alone)."""
    averaged_rounds: int = 0
    """Rounds that averaged with other peers."""
    failed_rounds: int = 0
    """Rounds that ended in an error or a timeout, or whose result was rejected (this peer went on with its own
    gradients or progress)."""
    sent_bytes: int = 0
    """Estimated bytes this peer sent in averaged rounds (see ``allreduce_bytes_sent``). Only the gradient or
    pseudo-gradient rounds: state-averaging rounds (``gradient``), exact syncs (``diloco``) and state downloads
    are not counted."""
    averaging_seconds: float = 0.0
    """Seconds of the averaged rounds, each from the hand-off to its end. In ``diloco`` they run in the background
    while the peer trains; in ``gradient`` (without ``overlap``) the training thread waits for them."""
    wait_seconds: float = 0.0
    """Seconds the training thread was blocked on the swarm, the time it could not compute. ``diloco``: waiting for
    a round still in flight when the next is due, exact syncs, state downloads. ``gradient``: the gradient all-reduce
    of each swarm step (from hand-off to result; none with ``overlap``, where it runs in the background) and state
    downloads; the optimizer step itself and hivemind's background state averaging are not counted."""


class SwarmEvents:
    """What the strategy reports as it happens; this base keeps ``totals`` and nothing else.

    ``monitor.exporter.PeerExporter`` counts these for Prometheus. Calls may come from hivemind's background threads.
    """

    def __init__(self) -> None:
        self.totals = SwarmTotals()
        self._lock = threading.Lock()

    def snapshot(self) -> SwarmTotals:
        """A consistent copy of ``totals`` (hooks may be adding to them from other threads)."""
        with self._lock:
            return dataclasses.replace(self.totals)

    def averaging_round(self, outcome: str, seconds: float | None, sent_bytes: int = 0) -> None:
        """An averaging round ended: ``averaged`` (with others), ``failed`` (error or timeout: this peer went on
        with its own gradients or progress), ``rejected`` (its result failed the check of what a peer receives,
        ``core.averaging.aggregation.refusal``: not applied; counted as failed in ``totals``) or ``alone`` (no other
        peer: nothing to average). ``seconds``: from
        handing this peer's tensors to the round until it ended, None when no round ran. ``sent_bytes``: estimated
        bytes this peer sent in it (``allreduce_bytes_sent``), 0 unless averaged."""
        with self._lock:
            self.totals.rounds += 1
            if outcome == "averaged":
                self.totals.averaged_rounds += 1
                self.totals.sent_bytes += sent_bytes
                self.totals.averaging_seconds += seconds or 0.0
            elif outcome in ("failed", "rejected"):
                self.totals.failed_rounds += 1

    def waited(self, seconds: float) -> None:
        """The training thread was blocked on the swarm for ``seconds`` more (see ``SwarmTotals.wait_seconds``)."""
        with self._lock:
            self.totals.wait_seconds += seconds

    def state_download(self, outcome: str, seconds: float) -> None:
        """A download of the swarm's state ended: ``loaded`` (moved this peer to a newer swarm step), ``current``
        (no peer had a newer one) or ``failed`` (given up at ``load_state_timeout``). Its time is reported through
        ``waited`` as well. Besides, ``refused`` (``seconds`` 0) once for every state a peer sent that failed the
        check (``remote_state.StateCheck``: other shapes or dtypes, NaN or Inf, a swarm step too far ahead): it
        was not applied, and the peer with the next priority was asked, in the same download."""

    def batch_skipped(self, reason: str) -> None:
        """A local batch's gradients were kept out of the swarm: ``nonfinite`` (NaN or Inf in them) or ``behind``
        (the swarm had moved on: hivemind dropped them and loaded the swarm's state)."""
