"""``DiLoCoOptimizer``: what the Lightning strategy steps in a ``diloco`` swarm (``diloco`` explains the algorithm)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from hivemind.optim.progress_tracker import ProgressTracker

from vitpeer.peer.core.algorithms.diloco_rounds import DiLoCo
from vitpeer.peer.core.averaging.events import SwarmEvents
from vitpeer.peer.core.averaging.hivemind_averagers import say_goodbye
from vitpeer.peer.core.averaging.poison_guard import PoisonGuard, all_finite

log = logging.getLogger(__name__)


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
        self.guard = PoisonGuard(events)
        """Local batches whose gradients (or inner step) went NaN or Inf: not stepped, not counted toward the target."""
        self.dropped_behind = 0  # always: diloco steps each batch before it checks whether it is behind
        self.parameters_version = 0
        """Bumped whenever the outer loop wrote the parameters (a round applied, a sync, a download)."""
        self._reported_rounds = 0
        self._reported_wait = 0.0  # of ``DiLoCo.wait_seconds``, passed on to the events
        self._reported_refused = 0  # of ``DiLoCo.refused_states``, passed on to the events
        self._alive = True

    # torch declares ``state`` and ``param_groups`` as plain attributes; here they read and write the inner optimizer's

    @property
    def state(self) -> dict:  # pyright: ignore[reportIncompatibleVariableOverride]  # a property over torch's attribute
        return self.opt.state  # the inner optimizer's live dict: torch's load_state_dict replaces it on a restore

    @property
    def param_groups(self) -> list[dict]:  # Lightning reads and sets the learning rate through these
        return self.opt.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:  # pyright: ignore[reportIncompatibleVariableOverride]  # a property over torch's attribute
        self.opt.param_groups = groups

    @property
    def skipped_batches(self) -> int:
        return self.guard.skipped

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

    def step(self, closure: Callable[[], Any] | None = None, batch_size: int | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.guard.refuses((p.grad for group in self.opt.param_groups for p in group["params"]), self.local_epoch):
            return loss  # not stepped, not counted toward the swarm's target
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
        if all_finite(params):
            return False
        self.guard.skip(
            "an inner step at swarm step %d left NaN or Inf in the parameters: back to where this round began "
            "(check the learning rate and the precision)",
            self.local_epoch,
        )
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
