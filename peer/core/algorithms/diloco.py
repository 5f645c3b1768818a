"""DiLoCo rounds over hivemind: peers train alone for a whole swarm step, then average how far they moved.

``swarm.algorithm = diloco`` (arXiv 2311.08105; OpenDiLoCo, arXiv 2407.07852, ran it on hivemind). One swarm step
(one *round*), read top to bottom:

1. Every peer trains with its own inner optimizer (the module's AdamW and schedule) on its own data, starting from
   ``shared``, its copy of the swarm's shared parameters. Each local step reports its samples to hivemind's
   ``ProgressTracker``; nothing else crosses the network.
2. When the swarm together has trained ``target_batch_size`` samples since the last round, each peer takes its
   *pseudo-gradient*, ``shared - local`` (how far it moved), and hands it to a hivemind all-reduce weighted by the
   samples it trained (fp16 on the wire by default). The round runs in the averager's own process: the peer goes
   straight on training the next round.
3. When the average arrives (checked after every local step), the *outer optimizer* (SGD with Nesterov momentum; lr
   0.7 and momentum 0.9 by default, as in DiLoCo) steps ``shared`` with it, and the local parameters are rebased onto
   the new shared point, keeping the progress made since the hand-off: ``local <- shared + (local - hand_off)``.
   This is DiLoCo with its outer update one round late, the overlap of "Eager updates for overlapped communication
   in DiLoCo" (arXiv 2502.12996, its delayed variant), except that we apply the update as soon as it arrives
   rather than at the end of the next round. The next pseudo-gradient is then exactly the next round's progress.
4. A peer waits for the network only when the previous round is still in flight when the next one is due.

Rules that keep the swarm together:
- Peers in one round get the same average and step the same outer optimizer from the same ``shared``, so their
  ``shared`` stay equal up to compression rounding (hivemind hands each peer ``own part + compressed(average - own
  part)``). The peers average ``shared`` (and the outer momentum, when there is one) themselves, exactly (fp32), in
  a *sync*: every ``sync_every`` steps (rounding drift), once after the last round, and at the hand-off after a round
  that did not average this peer with every peer it now counts (it failed, its group was smaller, or it ran alone
  before the others were seen): peers that drifted apart then hold the same state again. Every peer starts from the
  same initial parameters (``trainer.seed``), so none is needed at the start. A sync blocks training and moves the
  model in fp32 (twice with momentum), so it happens only when needed; a peer that wants one and meets no one loses
  one matchmaking window.
- A round that fails (timeout, a peer left mid-round) is not applied: its progress stays in the local parameters and
  goes into the peer's next pseudo-gradient, and the next hand-off begins with a sync (above).
- Non-finite values never reach the others: a local batch whose gradients hold NaN or Inf is not stepped; an inner
  step that leaves NaN or Inf in the parameters (finite gradients can overflow) is undone by returning to where the
  round began (its inner optimizer statistics that went non-finite are reset); and a peer whose pseudo-gradient
  still holds NaN or Inf does not send it: it drops that round's progress and returns to ``shared``.
- A straggler costs the others at most ``matchmaking_time`` + ``averaging_timeout``: the round goes on without it.
- A late joiner downloads ``shared``, the outer momentum and the swarm step within ``load_state_timeout`` from the
  peer with the newest swarm step (the state-sharing protocol of hivemind's ``DecentralizedAverager``). A state of
  other shapes or dtypes, with NaN or Inf, or too far ahead (``remote_state.StateCheck``) is refused and the
  peer with the next priority asked. A peer offers
  its state only once it has applied a round: peers that start a swarm together do not download each other's
  untrained state (a whole model each, 18-24 s over a 100 Mbit/s link).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hivemind
import torch
from hivemind.averaging.control import StepControl
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.optim.progress_tracker import ProgressTracker

from vitpeer.peer.core.averaging.events import SwarmEvents, allreduce_bytes_sent
from vitpeer.peer.core.averaging.hivemind_averagers import GroupSizedAverager, say_goodbye
from vitpeer.peer.core.averaging.remote_state import StateCheck, download_bound

log = logging.getLogger(__name__)

REPORT_EVERY = 0.25
"""Seconds between progress reports. hivemind's tracker stores a signed DHT record at every report; one per local
step (every ~40 ms with digits_tiny) kept the DHT process busy on the trainer's core. Others' estimates extrapolate
from a report with its samples per second, and they fetch at most every 0.5 s, so 0.25 s loses nothing."""


class OuterAverager(GroupSizedAverager):
    """hivemind's averager over the pseudo-gradients; serves the shared state to peers that download it."""

    def __init__(self, serve_state, **kwargs):
        self._serve_state = serve_state
        super().__init__(**kwargs)

    def get_current_state(self):  # hivemind calls it (in this process) when another peer downloads the state
        return self._serve_state()


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
    started: float = field(default_factory=time.perf_counter)


@dataclass
class RoundResult:
    """What became of a round, for metrics and logs."""

    epoch: int
    outcome: str
    """``averaged`` (with others), ``alone`` (no other peer) or ``failed`` (not applied; the state is downloaded)."""
    group_size: int
    seconds: float
    """From the hand-off until the result was applied (or given up)."""
    bytes_sent: int
    """Estimated bytes this peer sent (``allreduce_bytes_sent``: 2 (N - 1) / N of the compressed tensors)."""


class DiLoCo:
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
        averager_args = dict(
            dht=dht,
            start=True,
            min_matchmaking_time=matchmaking_time,
            request_timeout=min(3.0, matchmaking_time / 2),
            # bound the all-reduce itself, as hivemind.Optimizer does: unbounded, a round with a peer that died in it
            # never ends, and its averager keeps the tensors locked, so the next hand-off waits forever
            allreduce_timeout=averaging_timeout,
            next_chunk_timeout=matchmaking_time,
            client_mode=client_mode,
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
        self.tracker = ProgressTracker(
            dht, run_id, target_batch_size, client_mode=client_mode, metadata_expiration=progress_expiration, start=True
        )

    @property
    def num_peers(self) -> int:
        return self.tracker.global_progress.num_peers

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
        control = None
        if self.num_peers > 1:
            with self.averager.get_tensors() as buffers:
                for buffer, delta in zip(buffers, own, strict=True):
                    buffer.copy_(delta)
            self.averager.set_group_size(self.num_peers)  # the group closes as soon as every peer is in
            try:
                deadline = self.matchmaking_time + self.averaging_timeout
                control = self.averager.step(weight=float(max(samples, 1)), timeout=deadline, wait=False)
            except Exception as err:  # could not even be scheduled: its progress goes into the next round
                log.warning("could not start the round of swarm step %d: %r", epoch, err)
                self.in_flight = None
                return
        self.in_flight = Round(epoch=epoch, control=control, own=own, hand_off=hand_off, peers=self.num_peers)
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
                with self.averager.get_tensors() as buffers:
                    average = [buffer.clone() for buffer in buffers]
        sent = allreduce_bytes_sent(self.wire_bytes, group_size) if outcome == "averaged" else 0
        self.out_of_step = outcome == "failed" or (outcome == "averaged" and group_size < pending.peers)
        self.last_alone = outcome == "alone"
        self.rounds.append(RoundResult(pending.epoch, outcome, group_size, time.perf_counter() - pending.started, sent))
        if outcome == "failed":  # not applied: its progress stays in the local parameters and joins the next round
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

    # --- the shared state: synced exactly, served to joiners, downloaded when behind --------------------------

    def _sync_due(self, step: int) -> bool:
        """Whether the round that ends at swarm step ``step`` begins with a sync of ``shared``: every ``sync_every``,
        and after a round that left this peer out of step (see the module docstring). Peers decide from the step or
        from what they saw of the same round, so they meet in it (a peer that counts no other peer skips it). The
        final sync is ``finish``'s."""
        apart = self.out_of_step or (self.last_alone and self.num_peers > 1)
        return step % self.sync_every == 0 or apart

    def outer_state(self) -> tuple[dict, list[torch.Tensor]]:
        """(metadata, tensors) of the shared state: the swarm step, ``shared`` and the outer momentum."""
        with self.lock:
            momentum = [self.outer.state.get(s, {}).get("momentum_buffer") for s in self.shared]
            momentum = [
                torch.zeros_like(s) if m is None else m.clone() for s, m in zip(self.shared, momentum, strict=True)
            ]
            return {"epoch": self.epoch}, [s.clone() for s in self.shared] + momentum

    def _set_outer_state(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace ``shared`` and the outer momentum with ``tensors`` (``outer_state``'s layout)."""
        count = len(self.shared)
        with torch.no_grad(), self.lock:
            for s, value in zip(self.shared, tensors[:count], strict=True):
                s.copy_(value)
            for s, value in zip(self.shared, tensors[count:], strict=True):
                self.outer.state[s]["momentum_buffer"] = value.clone()

    def _take_outer_state(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace ``shared`` and the momentum, and move the local parameters with them."""
        base = [s.clone() for s in self.shared]
        self._set_outer_state(tensors)
        self._rebase(base)

    def sync_shared(self) -> bool:
        """Average ``shared`` and the outer momentum exactly (fp32) with the peers that meet here; a peer that counts
        no other peer skips it."""
        self.out_of_step = self.last_alone = False  # one try: a peer that meets no one waits for the next sync
        if self.num_peers <= 1:
            return False
        started = time.perf_counter()
        _, full = self.outer_state()
        state = full if self.sync_momentum else full[: len(self.shared)]
        with self.syncer.get_tensors() as buffers:
            for buffer, value in zip(buffers, state, strict=True):
                buffer.copy_(value)
        self.syncer.set_group_size(max(2, self.num_peers))
        try:  # one matchmaking window, no retries: a peer that is alone loses only that
            gathered = self.syncer.step(timeout=2 * self.matchmaking_time + self.averaging_timeout, allow_retries=False)
        except Exception as err:
            gathered = None
            log.debug("syncing the shared state failed: %r", err)
        if gathered:
            with self.syncer.get_tensors() as buffers:
                synced = [buffer.clone() for buffer in buffers]
            self._take_outer_state(synced if self.sync_momentum else synced + full[len(self.shared) :])
        self.wait_seconds += time.perf_counter() - started
        return bool(gathered)

    def expected_state(self) -> StateCheck:
        """What a downloaded shared state must be: ``shared`` and the momentum (fp32, this peer's shapes), at most
        ``EPOCH_AHEAD`` swarm steps past the newest this peer sees and never past ``max_steps`` (``download_bound``)."""
        layout = tuple((s.shape, torch.float32) for s in self.shared) * 2
        return StateCheck(layout=layout, max_epoch=download_bound(self.dht, self.run_id, self.epoch, self.max_steps))

    @property
    def refused_states(self) -> int:
        """Downloaded states refused so far (``remote_state.StateCheck``): never applied."""
        return self.averager.refused_states

    def load_state_from_peers(self) -> bool:
        """Download the shared state within ``load_state_timeout``; True if it moved this peer. Every state is
        checked before it is taken (``expected_state``): a refused one is skipped for the peer with the next
        priority."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.load_state_timeout
        loaded, empty = None, 0
        while loaded is None and empty < 3 and time.monotonic() < deadline:
            refused = self.refused_states
            try:
                loaded = self.averager.load_state_from_peers(timeout=max(1.0, deadline - time.monotonic()))
                empty += loaded is None  # nobody offered a state (a new swarm), or every offer failed
            except Exception as err:  # a download timed out: try again until the deadline
                log.debug("a state download failed: %r", err)
            if loaded is None and self.refused_states > refused:
                break  # every peer that answered sent a state that was refused: asking them again changes nothing
            if loaded is None and time.monotonic() < deadline:
                time.sleep(0.5)
        self.wait_seconds += time.perf_counter() - started
        if loaded is None:
            log.info("no peer offered an acceptable shared state; training on from this peer's own")
            return False
        metadata, tensors = loaded
        if int(metadata["epoch"]) < self.epoch:  # e.g. only the coordinator serves, a step behind: keep our own
            log.info("the offered shared state (swarm step %s) is older than ours: kept ours", metadata["epoch"])
            return False
        self.in_flight = None  # a round of an older step: its result no longer applies
        self._take_outer_state(tensors)
        with self.tracker.pause_updates():
            self.epoch = self.tracker.update_epoch(max(self.epoch, int(metadata["epoch"])))
        self.samples = 0
        self._offer_state()
        log.info("loaded the shared state of swarm step %s in %.1f s", metadata["epoch"], time.perf_counter() - started)
        return True

    def restore(self, epoch: int, tensors: Sequence[torch.Tensor]) -> None:
        """A checkpoint's shared state (the local parameters come back with the module's own weights)."""
        self._set_outer_state(tensors)
        with self.tracker.pause_updates():
            self.epoch = self.tracker.update_epoch(epoch)
        self._offer_state()  # a trained state: worth offering

    def shutdown(self) -> None:
        self.tracker.shutdown()
        self.averager.shutdown()
        self.syncer.shutdown()


class DiLoCoOptimizer(torch.optim.Optimizer):
    """What the Lightning strategy steps in a ``diloco`` swarm: the module's own optimizer (the inner one), then
    ``DiLoCo.after_local_step``. It answers the questions the strategy, the progress line, the reporter and the
    metrics ask of ``SwarmOptimizer`` (``local_epoch``, ``tracker``, ``local_progress``, ``opt``...), so the rest of
    the peer does not care which algorithm runs.

    The inner schedule (a ``LambdaLR``) counts swarm steps, as in the ``gradient`` algorithm: it is stepped when a
    round begins, so peers that joined at different times agree on the learning rate.
    """

    def __init__(self, inner: torch.optim.Optimizer, scheduler: Any | None, diloco: DiLoCo, events: SwarmEvents):
        self.opt, self.scheduler, self.diloco, self.events = inner, scheduler, diloco, events
        self.defaults = inner.defaults
        self.skipped_batches = 0
        """Local batches whose gradients held NaN or Inf: not stepped, not counted toward the swarm's target."""
        self.dropped_behind = 0  # always: diloco steps each batch before it checks whether it is behind
        self.parameters_version = 0
        """Bumped whenever the outer loop wrote the parameters (a round applied, a sync, a download)."""
        self._reported_rounds = 0
        self._reported_wait = 0.0  # of ``DiLoCo.wait_seconds``, passed on to the events
        self._reported_refused = 0  # of ``DiLoCo.refused_states``, passed on to the events
        self._alive = True

    @property
    def state(self) -> dict:  # the inner optimizer's live dict: torch's load_state_dict replaces it on a restore
        return self.opt.state

    @property
    def param_groups(self) -> list[dict]:  # Lightning reads and sets the learning rate through these
        return self.opt.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.opt.param_groups = groups

    @property
    def local_epoch(self) -> int:
        return self.diloco.epoch

    @property
    def tracker(self) -> ProgressTracker:
        return self.diloco.tracker

    @property
    def local_progress(self):
        return self.diloco.tracker.local_progress

    @property
    def target_batch_size(self) -> int:
        return self.diloco.tracker.target_batch_size

    def step(self, closure=None, batch_size: int | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.opt.param_groups for p in group["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            # the poison guard: a batch with NaN or Inf gradients is not stepped and not counted
            self.skipped_batches += 1
            log.warning(
                "non-finite gradients (NaN or Inf) in a local batch at swarm step %d: skipped", self.local_epoch
            )
            self.events.batch_skipped("nonfinite")
            return loss
        self.opt.step()
        if self._inner_step_overflowed():
            return loss
        before = self.diloco.epoch
        self.diloco.after_local_step(batch_size or 0)
        self._after_outer()
        if self.diloco.epoch != before:
            self._catch_up_schedule()
        return loss

    def _inner_step_overflowed(self) -> bool:
        """After an inner step from finite gradients: if the parameters went NaN or Inf (an overflow in the step),
        undo this peer's progress back to where it began (``DiLoCo.discard_local_progress``) and reset the inner
        optimizer's statistics that went non-finite, so the next steps start clean. Counted as a skipped batch."""
        params = [p for group in self.opt.param_groups for p in group["params"]]
        if not params or torch.isfinite(torch.nn.utils.get_total_norm(params)):
            return False
        self.skipped_batches += 1
        log.warning(
            "an inner step at swarm step %d left NaN or Inf in the parameters: back to where this round began "
            "(check the learning rate and the precision)",
            self.local_epoch,
        )
        self.events.batch_skipped("nonfinite")
        self.diloco.discard_local_progress()
        for param in params:
            state = self.opt.state.get(param, {})
            if any(isinstance(v, torch.Tensor) and not torch.isfinite(v).all() for v in state.values()):
                del self.opt.state[param]
        self._after_outer()
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def _catch_up_schedule(self) -> None:
        if self.scheduler is None:
            return
        with warnings.catch_warnings():  # a state download moves the schedule before the first optimizer step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            while self.scheduler.last_epoch < self.diloco.epoch:
                self.scheduler.step()

    def _after_outer(self) -> None:
        """Report rounds that ended (with their estimated bytes sent), refused states and the training thread's new
        time blocked on the swarm; count writes to the parameters."""
        for result in self.diloco.rounds[self._reported_rounds :]:
            seconds = result.seconds if result.outcome == "averaged" else None
            self.events.averaging_round(result.outcome, seconds, result.bytes_sent)
        self._reported_rounds = len(self.diloco.rounds)
        refused = self.diloco.refused_states
        for _ in range(refused - self._reported_refused):  # downloads here and in ``after_local_step``'s catch-up
            self.events.state_download("refused", 0.0)
        self._reported_refused = refused
        if self.diloco.wait_seconds > self._reported_wait:
            self.events.waited(self.diloco.wait_seconds - self._reported_wait)
            self._reported_wait = self.diloco.wait_seconds
        if self.diloco.writes != self.parameters_version:
            self.parameters_version = self.diloco.writes

    # --- what the strategy asks of a swarm optimizer ----------------------------------------------------------

    def load_state_from_peers(self) -> None:
        started, before = time.perf_counter(), self.diloco.epoch
        loaded = self.diloco.load_state_from_peers()
        outcome = "failed" if not loaded else ("loaded" if self.diloco.epoch > before else "current")
        self.events.state_download(outcome, time.perf_counter() - started)
        self._after_outer()
        self._catch_up_schedule()

    def prepare_last_step(self, max_steps: int) -> None:
        """Nothing to prepare: ``finish_pending`` applies the last round and syncs once after it."""

    def finish_pending(self) -> None:
        self.diloco.finish()
        self._after_outer()

    def stop_rounds(self) -> None:
        self.diloco.leaving = True

    def say_goodbye(self) -> None:
        say_goodbye(self.diloco.dht, self.diloco.tracker)

    def is_alive(self) -> bool:
        return self._alive

    def shutdown(self) -> None:
        if self._alive:
            self._alive = False
            self.diloco.shutdown()
            self.say_goodbye()

    def state_dict(self) -> dict:
        metadata, tensors = self.diloco.outer_state()
        return {"inner": self.opt.state_dict(), "swarm_epoch": metadata["epoch"], "outer_state": tensors}

    def load_state_dict(self, state_dict: dict) -> None:
        self.opt.load_state_dict(state_dict["inner"])
        self.diloco.restore(state_dict["swarm_epoch"], state_dict["outer_state"])
        self._catch_up_schedule()
