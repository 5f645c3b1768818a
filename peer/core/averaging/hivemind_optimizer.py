"""``SwarmOptimizer``: the ``hivemind.Optimizer`` that a ``gradient`` peer's strategy steps (part of the adapter room,
see ``hivemind_averagers``), and the private names of hivemind's Optimizer it touches:

- the poison guard: ``_check_and_accumulate_gradients`` keeps a batch with NaN or Inf gradients out of the swarm.
- round outcomes: ``_begin_averaging_gradients`` and ``_average_gradients_and_load_into_optimizer`` report each
  gradient round to ``SwarmEvents``, because hivemind swallows a failed round and steps with local gradients;
  with its estimated bytes sent and, when the training thread waited for it, its time as time blocked.
- group sizes: ``_maybe_schedule_gradient_averaging`` and ``_maybe_schedule_state_averaging`` tell the averagers
  how many peers a full group has before hivemind schedules a round (see ``_GroupSized``).
- our progress tracker: ``_make_progress_tracker`` builds a ``PlausibleProgressTracker`` (records claiming an
  implausible swarm step are not counted) with hivemind's own arguments.
- our state averager: ``_make_state_averager`` lends hivemind's module global
  ``hivemind.optim.optimizer.TrainingStateAverager`` our subclass while hivemind builds it.
- ``parameters_version``: the state averager's ``_apply_optimizer_parameters_`` and ``_apply_averaging_results_``
  are wrapped to count every write to the parameters, so local ranks know when to follow
  (``core.lightning.local_ranks``).
- a goodbye that waits: ``say_goodbye`` stores the tracker's farewell under ``tracker._local_public_key``.
- checkpoint restore: ``catch_up_scheduler`` calls ``TrainingStateAverager._update_scheduler`` (the coordinator
  uses it too).
- a guard for ``use_local_updates``: there hivemind steps the optimizer every local batch and never calls
  ``_check_and_accumulate_gradients``, so the public ``step`` keeps a non-finite batch from the optimizer.
- checked downloads: ``load_state_from_peers`` arms each download's ``_LoadDeadline`` and reports the states its
  averagers refused (``_CheckedDownload``).

The gradient averager's class and options reach hivemind through the public ``grad_averager_factory`` argument.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import hivemind
import torch
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.optim import optimizer as hivemind_optimizer
from hivemind.optim import state_averager
from hivemind.utils import get_dht_time
from torch.optim.lr_scheduler import LambdaLR

from vitpeer.peer.core.averaging.aggregation import Aggregation, mean
from vitpeer.peer.core.averaging.events import SwarmEvents, allreduce_bytes_sent
from vitpeer.peer.core.averaging.hivemind_averagers import (
    GradientAverager,
    PlausibleProgressTracker,
    TrainingStateAverager,
    _GroupSized,
    catch_up_scheduler,
    say_goodbye,
)
from vitpeer.peer.core.averaging.hivemind_downloads import _LoadDeadline
from vitpeer.peer.core.averaging.poison_guard import PoisonGuard
from vitpeer.peer.core.averaging.remote_state import StateCheck, download_bound, training_state_check

log = logging.getLogger(__name__)


def factory_form(optimizer: torch.optim.Optimizer, scheduler: Any | None) -> tuple[list[dict], Any, Any]:
    """A built optimizer and scheduler as hivemind's factory form: (param groups, optimizer and scheduler factories).

    Every group carries all its hyper-parameters, so ``type(optimizer)(groups)`` rebuilds the optimizer. The
    scheduler must be a ``LambdaLR``: hivemind steps it once per swarm step, and a pure function of the step lets
    peers that joined at different times (and the coordinator) agree on the learning rate.
    """
    if scheduler is not None and not isinstance(scheduler, LambdaLR):
        raise ValueError(
            f"HivemindStrategy rebuilds the scheduler once per swarm step and needs a LambdaLR, got "
            f"{type(scheduler).__name__}; express the schedule as LambdaLR(optimizer, step -> factor)"
        )
    lambdas = scheduler.lr_lambdas if scheduler is not None else None
    groups = [dict(group) for group in optimizer.param_groups]
    return (
        groups,
        lambda params: type(optimizer)(params),  # pyright: ignore[reportCallIssue]  # torch's base class takes defaults; the module's own class has them
        (lambda opt: LambdaLR(opt, lambdas)) if lambdas is not None else None,
    )


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer with a deadline on state downloads, a check of every downloaded state, checkpoint restore
    that keeps the LR in step, a guard that keeps non-finite gradients out of the swarm, and ``SwarmEvents`` for
    rounds, downloads and skipped batches.

    ``max_steps``: the run's last swarm step (``trainer.max_steps``); no downloaded state may be past it."""

    state_averager: TrainingStateAverager  # ours, as ``_make_state_averager`` builds it

    def __init__(
        self,
        events: SwarmEvents | None = None,
        max_steps: int | None = None,
        aggregation: Aggregation = mean,
        **kwargs,
    ):
        self.events = events or SwarmEvents()
        self.guard = PoisonGuard(self.events)  # keeps batches with NaN or Inf gradients out of the swarm
        self.aggregation = aggregation  # every round of both averagers reduces with it (``core.averaging.aggregation``)
        self.max_steps = max_steps
        self.synced_at_end = False  # the run's last step was followed by the final state round (``finish_pending``)
        if not kwargs.get("use_local_updates"):  # hivemind refuses a gradient averager factory with local updates
            # hivemind 1.1.12 forwards averager_opts to the state averager only, though its docstring says both: the
            # gradient averager kept request_timeout = 3 s against a shorter matchmaking_time, which hivemind itself
            # warns "can cause deadlocks" (a demo peer pair failed every gradient round so). The
            # public factory argument carries them, and our averager class, to the gradient averager.
            factory = kwargs.get("grad_averager_factory") or GradientAverager
            options = dict(kwargs.get("averager_opts") or {})
            kwargs["grad_averager_factory"] = functools.partial(factory, aggregation=aggregation, **options)
        super().__init__(**kwargs)
        self._loaders = []
        for averager in (self.state_averager, self.grad_averager):
            if averager is not None:
                loader = _LoadDeadline(averager.load_state_from_peers, self.load_state_timeout)
                averager.load_state_from_peers = loader
                self._loaders.append(loader)
        self.dropped_behind = 0
        """Local batches hivemind dropped because this peer was behind the swarm: it loaded the swarm's state
        instead of sending them (see ``_should_load_state_from_peers``)."""
        self.parameters_version = 0
        """Bumped whenever hivemind writes this peer's parameters: an optimizer step, a (background) averaging result
        applied at any later local step, a state download. Local ranks that follow this peer sync when it moves."""
        state = self.state_averager
        # hivemind writes the parameters in these two private methods (and in a download); it tells no one when
        for name in ("_apply_optimizer_parameters_", "_apply_averaging_results_", "load_state_from_peers"):
            setattr(state, name, self._bumps_version(getattr(state, name)))
        state.state_check = self.expected_state

    def expected_state(self) -> StateCheck:
        """What a downloaded state must be (``StateCheck``): this peer's layout, at most ``EPOCH_AHEAD`` swarm steps
        past the newest it sees, never past ``max_steps`` (``download_bound``)."""
        bound = download_bound(self.dht, self.run_id, self.local_epoch, self.max_steps)
        return training_state_check(self.state_averager, bound)

    def _bumps_version(self, writes_parameters):
        def wrapped(*args, **kwargs):
            try:
                return writes_parameters(*args, **kwargs)
            finally:
                self.parameters_version += 1

        return wrapped

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> PlausibleProgressTracker:
        """hivemind's own tracker, counting only the records that claim a plausible swarm step."""
        return PlausibleProgressTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            max_steps=self.max_steps,
            **kwargs,
        )

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        # Changes which class hivemind builds its state averager from: ours (``_Aggregating``, ``_GroupSized``).
        # hivemind 1.1.12's
        # Optimizer takes a factory for the gradient averager (used above) but none for the state averager: its
        # ``_make_state_averager`` calls this module-level name, with the arguments it alone knows. Copying that call
        # here would drift silently from hivemind's, and changing the class after it is built is too late (the
        # averager's process has started with hivemind's class, and ``_set_group_size`` runs there). So the name is
        # lent for this call and restored; not thread-safe: build one SwarmOptimizer at a time.
        hivemind_optimizer.TrainingStateAverager = functools.partial(
            TrainingStateAverager, aggregation=self.aggregation
        )
        try:
            averager = super()._make_state_averager(**kwargs)
        finally:
            hivemind_optimizer.TrainingStateAverager = state_averager.TrainingStateAverager
        if not isinstance(averager, TrainingStateAverager):
            raise TypeError(
                f"hivemind built its state averager as {type(averager).__name__}, not from the name lent to it: read "
                "SwarmOptimizer._make_state_averager against the installed hivemind's"
            )
        return averager

    def _maybe_schedule_gradient_averaging(self) -> None:
        if self.tracker.global_progress.num_peers <= 1:
            # alone, hivemind pre-schedules a round only to cancel it when the step comes ("no other peers"); a cancel
            # that landed while a joining peer was matching with this averager once left its matchmaking broken for
            # the rest of the run (seen in test_prometheus.py: neither peer averaged again)
            return
        # hivemind pre-schedules the next round's matchmaking here: size the group first (see ``_GroupSized``)
        self._size_groups(self.grad_averager)
        super()._maybe_schedule_gradient_averaging()

    def _maybe_schedule_state_averaging(self) -> None:
        self._size_groups(self.state_averager)  # as above, for the state-averaging round
        super()._maybe_schedule_state_averaging()

    def _size_groups(self, averager) -> None:
        if isinstance(averager, _GroupSized):
            averager.set_group_size(max(2, self.tracker.global_progress.num_peers))

    # The three hooks below wrap hivemind 1.1.12's gradient steps: the first keeps poison out, the others only report.

    def _check_and_accumulate_gradients(self, batch_size: int, grad_scaler) -> bool:
        # The poison guard. One NaN in what a peer sends turns the whole swarm's average, and so every peer's
        # parameters, into NaN. A batch with non-finite gradients is left out of this peer's accumulator (the good
        # ones gathered before stay), its samples are not reported, and the step goes on: this peer still takes part
        # in the round with what it has, so it stays in step with the swarm.
        if self._skips_nonfinite_batch():
            return True
        return super()._check_and_accumulate_gradients(batch_size, grad_scaler)

    def step(self, closure=None, batch_size: int | None = None, grad_scaler=None):
        if not self.use_local_updates or self.auxiliary:
            return super().step(closure, batch_size, grad_scaler)
        # With local updates hivemind steps the optimizer on every batch and never calls the guard above; the
        # parameters it moves are averaged with the swarm's in the next state round. So a batch with non-finite
        # gradients is not stepped at all here (nor counted toward the swarm's target). hivemind's own order is kept:
        # delayed updates applied, then the closure, then the step.
        self.state_averager.step(apply_delayed_updates=True)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._skips_nonfinite_batch():
            super().step(batch_size=batch_size, grad_scaler=grad_scaler)
        return loss

    def _should_load_state_from_peers(self) -> bool:
        # hivemind asks this in ``step`` only, after the batch's gradients exist: True drops them unchecked and loads
        # the swarm's state. Counted, so a user sees samples lost to catching up (and a NaN batch dropped here was
        # never sent either)
        behind = super()._should_load_state_from_peers()
        if behind and not self.auxiliary:
            self.dropped_behind += 1
            self.events.batch_skipped("behind")
        return behind

    def _skips_nonfinite_batch(self) -> bool:
        """True, counted and logged, when this local batch's gradients hold NaN or Inf."""
        return self.guard.refuses((param.grad for param in self.state_averager.main_parameters), self.local_epoch)

    @property
    def skipped_batches(self) -> int:
        """Local batches whose gradients held NaN or Inf and were not sent (see ``_check_and_accumulate_gradients``)."""
        return self.guard.skipped

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        began = super()._begin_averaging_gradients(grad_scaler)
        if not began:  # no round: alone in the swarm, or hivemind could not start one
            self.events.averaging_round("alone" if self.tracker.global_progress.num_peers <= 1 else "failed", None)
        return began

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
        started = time.perf_counter()
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        if maybe_step_control is None:
            self.events.averaging_round("alone", None)
            return
        seconds = time.perf_counter() - started
        if not self.delay_grad_averaging:  # hivemind waited for the round in the training thread, not in background
            self.events.waited(seconds)
        # hivemind swallows a failed or timed-out round and steps with local gradients; the future tells which
        control = maybe_step_control
        averaged = control.done() and not control.cancelled() and control.exception() is None
        sent = allreduce_bytes_sent(self.gradient_wire_bytes(), len(control.result())) if averaged else 0
        self.events.averaging_round("averaged" if averaged else "failed", seconds, sent)

    def gradient_wire_bytes(self) -> float:
        """Bytes of this peer's gradients as compressed for a round (an estimate: hivemind's compression ratio)."""
        averager = self.grad_averager
        if averager is None:
            raise RuntimeError("no gradient rounds: with use_local_updates hivemind makes no gradient averager")
        compression = averager.allreduce_kwargs["compression"]  # hivemind's dict holds its other options too
        if not isinstance(compression, CompressionBase):
            raise TypeError(f"the gradient averager's compression is {compression!r}, not a hivemind CompressionBase")
        ratio = compression.estimate_compression_ratio
        # one averaged gradient per parameter, of its shape and dtype
        return sum(p.numel() * p.element_size() * ratio(CompressionInfo.from_tensor(p)) for p in averager.parameters)

    def load_state_from_peers(self, **kwargs) -> None:
        started, before = time.perf_counter(), self.local_epoch
        for loader in self._loaders:
            loader.arm()  # this download's own deadline, whatever the last one left (hivemind's retries share it)
        refused = self.state_averager.refused_states
        super().load_state_from_peers(**kwargs)
        for _ in range(self.state_averager.refused_states - refused):
            self.events.state_download("refused", 0.0)
        if any(loader.gave_up for loader in self._loaders):
            outcome = "failed"
        else:
            outcome = "loaded" if self.local_epoch > before else "current"
        seconds = time.perf_counter() - started
        if outcome == "loaded":  # the start's download, or hivemind's catch-up in ``step`` when this peer fell behind
            log.info("loaded the swarm's state at step %d in %.1f s", self.local_epoch, seconds)
        self.events.state_download(outcome, seconds)
        self.events.waited(seconds)  # the training thread downloads: it cannot compute meanwhile

    def shutdown(self) -> None:
        super().shutdown()
        self.say_goodbye()

    def say_goodbye(self) -> None:
        say_goodbye(self.dht, self.tracker)

    # What the strategy asks of a swarm optimizer, whichever the algorithm (``core.algorithms.diloco.DiLoCoOptimizer``
    # too):

    def prepare_last_step(self, max_steps: int) -> None:
        """The last swarm step ends with a state round whatever ``average_state_every`` says, so every peer's last
        checkpoint holds the swarm's common parameters (hivemind decides by the step's number as it begins)."""
        self.average_state_every = 1

    def finish_pending(self) -> None:
        """Wait for the background state round (and, with ``overlap``, the optimizer step) still in flight and
        apply its result to the parameters; at the run's last step, then average the state once more with the peers
        still here (``_final_state_round``), so that every peer ends with the same parameters."""
        self.state_averager.step(wait_for_delayed_updates=True)
        if self.max_steps is not None and self.local_epoch >= self.max_steps and not self.synced_at_end:
            self.synced_at_end = True
            self._final_state_round()

    def _final_state_round(self) -> None:
        """One blocking state round with every peer the tracker counts, open for ``averaging_timeout`` seconds.

        The last step's state round averages only the peers that took that step together. A peer one step behind
        (it took its last step alone, e.g. after joining late) would end apart from the others, who leave once they
        reach ``max_steps``: here the first to finish waits for it, up to the window, and its own last state round
        joins this one. A full group begins at once; a peer that counts no other skips it."""
        if self.tracker.global_progress.num_peers <= 1:
            return
        self._size_groups(self.state_averager)
        started = time.perf_counter()
        window = self.averaging_timeout if self.averaging_timeout is not None else 60.0  # hivemind's default
        options = {"scheduled_time": get_dht_time() + window, "timeout": 2 * window}
        self.state_averager.step(averaging_round=True, delay_averaging=False, averaging_opts=options)
        self.events.waited(time.perf_counter() - started)

    def stop_rounds(self) -> None:
        """Leaving: start no more state-averaging rounds. The gradient round in flight goes on, so the others, who
        wait for this peer's part, lose nothing."""
        self.average_state_every = 2**31  # hivemind averages state when the next epoch divides by it

    def zero_grad(self, set_to_none: bool = True) -> None:
        # an offloaded optimizer reads the same .grad tensors every step: zero them, never replace them
        super().zero_grad(set_to_none=set_to_none and not self.offload_optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        catch_up_scheduler(self.state_averager)  # hivemind's own catch-up: scheduler steps == local_epoch
        self.tracker.report_local_progress(self.local_epoch, samples_accumulated=0)
