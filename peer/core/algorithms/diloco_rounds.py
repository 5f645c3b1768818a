"""The outer loop of a ``diloco`` peer (``DiLoCo``): counting the swarm's samples, handing off rounds, applying their
results; ``diloco`` explains the algorithm top to bottom, ``diloco_shared`` the shared state it keeps."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hivemind
import torch
from hivemind.averaging.control import StepControl
from hivemind.compression import CompressionBase, CompressionInfo

from vitpeer.peer.core.algorithms.diloco_shared import SEARCH_WINDOW, OuterAverager, SharedState
from vitpeer.peer.core.averaging.aggregation import Aggregation, mean, refusal
from vitpeer.peer.core.averaging.events import allreduce_bytes_sent
from vitpeer.peer.core.averaging.hivemind_averagers import GroupSizedAverager, PlausibleProgressTracker

REPORT_EVERY = 0.25
"""Seconds between progress reports. hivemind's tracker stores a signed DHT record at every report; one per local
step kept the DHT process busy on the trainer's core. Others' estimates extrapolate
from a report with its samples per second, and they fetch at most every 0.5 s, so 0.25 s loses nothing."""

ROUND_BOUND = 8.0
"""A round's result (the swarm's pseudo-gradient) may be at most this many times as long as this peer's own, times
how far this peer's samples fell short of its share of the swarm step (``round_bound``): a longer one is rejected,
never applied (``aggregation.refusal``). Peers train on different data, so honest results differ from each peer's
own, but a peer that trained its share sees nothing like a factor of 8."""


def round_bound(target_batch_size: int, peers: int, samples: int) -> float:
    """``ROUND_BOUND``, widened for a peer that trained less than its share (``target / peers``) of the swarm step: a
    CPU peer among GPU peers makes a small part of each step, and the others' progress is longer than its own."""
    share = target_batch_size / max(peers, 1)
    return ROUND_BOUND * max(1.0, share / max(samples, 1))


log = logging.getLogger(__name__)


@dataclass
class Round:
    """One round handed to the averager: its all-reduce in flight and what this peer needs to apply it."""

    epoch: int
    control: StepControl | None
    """hivemind's handle of the all-reduce; None when this peer is alone in the swarm (nothing to average)."""
    own: list[torch.Tensor]
    """This peer's pseudo-gradient (host memory): what it applies when alone."""
    hand_off: list[torch.Tensor]
    """The local parameters at the hand-off: the progress made since then is kept on top of the result."""
    peers: int = 1
    """Peers this peer counted at the hand-off."""
    samples: int = 0
    """Samples this peer trained for this round."""
    started: float = field(default_factory=time.perf_counter)


@dataclass
class RoundResult:
    """What became of a round, for metrics and logs."""

    epoch: int
    outcome: str
    """``averaged`` (with others), ``alone`` (no other peer), ``failed`` or ``rejected`` (its result failed the check
    of what a peer receives); neither of the last two is applied."""
    group_size: int
    seconds: float
    """From the hand-off until the result was applied (or given up)."""
    bytes_sent: int
    """Estimated bytes this peer sent (``allreduce_bytes_sent``: 2 (N - 1) / N of the compressed tensors)."""


class DiLoCo(SharedState):
    """The outer loop of one peer: counts the swarm's samples, runs the rounds, keeps ``shared`` and the outer
    optimizer. The training loop calls ``after_local_step(samples)`` after every inner optimizer step.

    ``params`` are the module's parameters (on any device); they are read and rebased in place, never replaced.
    ``max_steps``: the run's last swarm step (``trainer.max_steps``); no downloaded state may be past it.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        dht: hivemind.DHT,
        run_id: str,
        target_batch_size: int,
        outer_lr: float,
        outer_momentum: float,
        compression: CompressionBase,
        matchmaking_time: float,
        averaging_timeout: float,
        load_state_timeout: float,
        progress_expiration: float,
        sync_every: int,
        client_mode: bool = False,
        max_steps: int | None = None,
        aggregation: Aggregation = mean,
    ):
        self.params = list(params)
        self.max_steps, self.run_id = max_steps, run_id
        self.dht = dht
        self.matchmaking_time, self.averaging_timeout = matchmaking_time, averaging_timeout
        self.load_state_timeout, self.sync_every = load_state_timeout, sync_every
        self.lock = threading.Lock()  # ``shared`` and the outer momentum: the trainer writes, downloads read
        with torch.no_grad():
            self.shared = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        self.outer = torch.optim.SGD(self.shared, lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)
        self.epoch = 0
        self.samples = 0  # trained by this peer since the last hand-off
        self._reported_at = -float("inf")  # when the samples were last reported to the tracker
        self.in_flight: Round | None = None
        self.out_of_step = False  # the last round did not average with every peer counted: sync at the next hand-off
        self.last_alone = False  # the last round ran alone: if others are counted now, they may have moved apart
        self.finished = False  # ``finish`` ran: the last round is applied and the final sync done
        self.rounds: list[RoundResult] = []
        self.wait_seconds = 0.0  # the training thread's time spent waiting for rounds, syncs and downloads
        self.skipped_rounds = 0  # pseudo-gradients with NaN or Inf, kept out of the swarm
        self.writes = 0  # how often the outer loop wrote the local parameters (local ranks follow on a change)
        self.leaving = False  # set when the peer leaves: no new rounds
        numel = sum(s.numel() for s in self.shared)
        self.wire_bytes = int(
            numel * 4 * compression.estimate_compression_ratio(CompressionInfo.from_tensor(self.shared[0]))
        )
        averager_args: dict[str, Any] = dict(
            dht=dht,
            start=True,
            min_matchmaking_time=matchmaking_time,
            request_timeout=min(3.0, matchmaking_time / 2),
            # bound the all-reduce itself, as hivemind.Optimizer does: unbounded, a round with a peer that died in it
            # never ends, and its averager keeps the tensors locked, so the next hand-off waits forever
            allreduce_timeout=averaging_timeout,
            next_chunk_timeout=matchmaking_time,
            client_mode=client_mode,
            aggregation=aggregation,  # every round and sync reduces with the run's rule
        )
        self.averager = OuterAverager(
            self.outer_state,
            averaged_tensors=[torch.zeros_like(s) for s in self.shared],
            prefix=f"{run_id}_diloco",
            compression=compression,
            allow_state_sharing=False,  # on once this peer has applied a round (``_rebase``): nothing to offer before
            **averager_args,
        )
        self.averager.state_check = self.expected_state
        self.client_mode = client_mode
        self.sync_momentum = outer_momentum > 0  # without momentum its buffers are zeros: not worth sending
        self.syncer = GroupSizedAverager(  # exact (fp32) averaging of the shared state itself
            averaged_tensors=[torch.zeros_like(s) for s in self.shared * (2 if self.sync_momentum else 1)],
            prefix=f"{run_id}_diloco_sync",
            allow_state_sharing=False,
            **averager_args,
        )
        self.tracker = PlausibleProgressTracker(
            dht,
            run_id,
            target_batch_size,
            client_mode=client_mode,
            metadata_expiration=progress_expiration,
            start=True,
            max_steps=max_steps,
        )

    # --- the training thread's one call ---------------------------------------------------------------------

    def after_local_step(self, samples: int) -> bool:
        """Count a local step's samples; apply a round that arrived; hand off a round when the swarm is due.
        Returns True when this call moved the swarm step."""
        self.samples += samples
        now, tracker = time.monotonic(), self.tracker
        unreported = self.samples - tracker.local_progress.samples_accumulated
        if now - self._reported_at >= REPORT_EVERY or (
            tracker.global_progress.samples_accumulated + unreported >= tracker.target_batch_size
        ):  # at most every REPORT_EVERY, and at once when this step completes the swarm's target
            self._reported_at = now
            tracker.report_local_progress(self.epoch, self.samples)
        if self.in_flight is not None and self.in_flight.control is not None and self.in_flight.control.done():
            self._finish(self.in_flight)
        if self.tracker.global_epoch > self.epoch + 1:  # more than a round behind the swarm: catch up
            before = self.epoch
            self.load_state_from_peers()
            if self.epoch != before:
                return True
        if self.tracker.ready_to_update_epoch and not self.leaving:
            self._begin_round()
            return True
        return False

    def finish(self) -> None:
        """The end of training: apply a round still in flight and, with others, sync the shared state once more,
        so every peer ends with the same parameters. Once: the trainer may call it again at the end of fit."""
        if self.finished:
            return
        self.finished = True
        self._wait_for_round()
        self.sync_shared()

    # --- rounds ---------------------------------------------------------------------------------------------

    def _begin_round(self) -> None:
        self._wait_for_round()  # the only wait: the previous round is still in flight
        epoch = self.epoch
        if self._sync_due(epoch + 1):
            self.sync_shared()
        with torch.no_grad():
            hand_off = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
            own = [s - h for s, h in zip(self.shared, hand_off, strict=True)]
        with self.tracker.pause_updates():
            self.epoch = self.tracker.update_epoch(epoch + 1)
        samples, self.samples = self.samples, 0
        if not all(torch.isfinite(d).all() for d in own):
            self._drop_poisoned(epoch)
            return
        control: StepControl | None = None
        if self.num_peers > 1:
            with self.averager.get_tensors() as buffers:  # pyright: ignore[reportGeneralTypeIssues]  # hivemind annotates this context manager as the tensors it yields
                for buffer, delta in zip(buffers, own, strict=True):
                    buffer.copy_(delta)
            self.averager.set_group_size(self.num_peers)  # the group closes as soon as every peer is in
            try:
                deadline = SEARCH_WINDOW * self.matchmaking_time  # to find the group; the all-reduce has its own
                control = self.averager.step(weight=float(max(samples, 1)), timeout=deadline, wait=False)  # pyright: ignore[reportAssignmentType]  # hivemind types the result of wait=True; wait=False returns its StepControl
            except Exception as err:  # could not even be scheduled: its progress goes into the next round
                log.warning("could not start the round of swarm step %d: %r", epoch, err)
                self.in_flight = None
                return
        self.in_flight = Round(epoch, control, own, hand_off, peers=self.num_peers, samples=samples)
        if control is None:  # alone: the outer step takes this peer's own progress, now
            self._finish(self.in_flight)

    def _wait_for_round(self) -> None:
        if self.in_flight is not None:
            started = time.perf_counter()
            self._finish(self.in_flight)
            self.wait_seconds += time.perf_counter() - started

    def _finish(self, pending: Round) -> None:
        """Apply a handed-off round: the average (or this peer's own progress when alone) through the outer
        optimizer, then rebase the local parameters onto the new shared point."""
        self.in_flight = None
        outcome, group_size, average = "alone", 1, pending.own
        if pending.control is not None:
            try:
                gathered = pending.control.result(timeout=self.matchmaking_time + self.averaging_timeout + 5)
            except Exception as err:
                gathered = None
                log.debug("the round of swarm step %d failed: %r", pending.epoch, err)
            outcome, group_size = ("averaged", len(gathered)) if gathered else ("failed", 0)
            if gathered:
                with self.averager.get_tensors() as buffers:  # pyright: ignore[reportGeneralTypeIssues]  # hivemind annotates this context manager as the tensors it yields
                    average = [buffer.clone() for buffer in buffers]
                bound = round_bound(self.tracker.target_batch_size, pending.peers, pending.samples)
                why = refusal(average, pending.own, bound, apart=False)
                if why is not None:
                    outcome, group_size = "rejected", 0
                    log.warning("rejected the result of the round of swarm step %d: %s", pending.epoch, why)
        sent = allreduce_bytes_sent(self.wire_bytes, group_size) if outcome == "averaged" else 0
        self.out_of_step = outcome in ("failed", "rejected") or (outcome == "averaged" and group_size < pending.peers)
        self.last_alone = outcome == "alone"
        self.rounds.append(RoundResult(pending.epoch, outcome, group_size, time.perf_counter() - pending.started, sent))
        if outcome in ("failed", "rejected"):  # not applied: its progress stays local and joins the next round
            if outcome == "failed":
                log.warning("the round of swarm step %d failed; its progress goes into the next round", pending.epoch)
            return
        with torch.no_grad(), self.lock:
            for s, g in zip(self.shared, average, strict=True):
                s.grad = g
            self.outer.step()
            for s in self.shared:
                s.grad = None
        self._rebase(pending.hand_off)

    def _drop_poisoned(self, epoch: int) -> None:
        self.skipped_rounds += 1
        log.warning(
            "non-finite values (NaN or Inf) in this peer's progress of swarm step %d: not sent to the swarm; back to "
            "the shared parameters (check the learning rate, the data and the precision)",
            epoch,
        )
        self.discard_local_progress()

    def discard_local_progress(self) -> None:
        """Local parameters back to where this peer's current progress began: the hand-off of the round in flight
        (whose result will rebase them), else ``shared``."""
        base = self.in_flight.hand_off if self.in_flight is not None else self.shared
        with torch.no_grad():
            for param, value in zip(self.params, base, strict=True):
                param.copy_(value.to(param.device, param.dtype))
        self.writes += 1

    def _rebase(self, base: Sequence[torch.Tensor]) -> None:
        """``local <- shared + (local - base)``: the local parameters follow ``shared``, keeping their progress
        since ``base``."""
        with torch.no_grad():
            for param, b, s in zip(self.params, base, self.shared, strict=True):
                moved = param.detach().to("cpu", torch.float32) - b
                param.copy_((s + moved).to(param.device, param.dtype))
        self.writes += 1
        self._offer_state()

    def _offer_state(self) -> None:
        """Offer ``shared`` to joiners, with this swarm step as its priority. Not in client mode: others cannot
        reach this peer, and hivemind refuses any priority there ("averager in client mode cannot share its
        state", which ended a client-mode peer at its first round)."""
        if not self.client_mode:
            self.averager.state_sharing_priority = float(self.epoch)
            self.averager.allow_state_sharing = True

    def shutdown(self) -> None:
        self.tracker.shutdown()
        self.averager.shutdown()
        self.syncer.shutdown()
