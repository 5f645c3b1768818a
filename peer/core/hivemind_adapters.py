"""The adapter room: every place where vitpeer reaches into hivemind 1.1.12's private names is in this file.

``hivemind.Optimizer`` has no public hooks for several things a volunteer swarm needs, so vitpeer overrides or calls
some of its private methods and attributes. They are all here, so that upgrading hivemind means reading this one file
against the new hivemind's source. ``tests/peer/test_hivemind_adapters.py`` fails on any hivemind other than
``WRITTEN_FOR`` until someone has done that, and fails when a private name listed there (``ADAPTED``) shows up in
any other file. The rest of vitpeer uses only hivemind's public API.

What each adapter changes in hivemind, and the private names it touches:

- ``SwarmOptimizer``, the ``hivemind.Optimizer`` that every peer's strategy steps:
  - the poison guard: ``_check_and_accumulate_gradients`` keeps a batch with NaN or Inf gradients out of the swarm.
  - round outcomes: ``_begin_averaging_gradients`` and ``_average_gradients_and_load_into_optimizer`` report each
    gradient round to ``SwarmEvents``, because hivemind swallows a failed round and steps with local gradients;
    with its estimated bytes sent and, when the training thread waited for it, its time as time blocked.
  - group sizes: ``_maybe_schedule_gradient_averaging`` and ``_maybe_schedule_state_averaging`` tell the averagers
    how many peers a full group has before hivemind schedules a round (see ``_GroupSized``).
  - our state averager: ``_make_state_averager`` lends hivemind's module global
    ``hivemind.optim.optimizer.TrainingStateAverager`` our subclass while hivemind builds it.
  - ``parameters_version``: the state averager's ``_apply_optimizer_parameters_`` and ``_apply_averaging_results_``
    are wrapped to count every write to the parameters, so local ranks know when to follow (``core.local_ranks``).
  - a goodbye that waits: ``say_goodbye`` stores the tracker's farewell under ``tracker._local_public_key``.
  - checkpoint restore: ``catch_up_scheduler`` calls ``TrainingStateAverager._update_scheduler`` (the coordinator
    uses it too).
  - a guard for ``use_local_updates``: there hivemind steps the optimizer every local batch and never calls
    ``_check_and_accumulate_gradients``, so the public ``step`` keeps a non-finite batch from the optimizer.
  - checked downloads: ``load_state_from_peers`` arms each download's ``_LoadDeadline`` and reports the states its
    averagers refused (``_CheckedDownload``).
- ``_GroupSized``, mixed into hivemind's two averager classes: it sends ``_set_group_size`` through the averager's
  ``_outer_pipe``, and in the averager's process sets ``_matchmaking.target_group_size``.
- ``_LoadDeadline`` ends hivemind's endless retry loop of state downloads. It replaces the averagers' public
  ``load_state_from_peers``, but it changes what hivemind's own loop does. Each download is armed with its own
  deadline before hivemind's loop starts; the loop's retries keep it.
- ``_CheckedDownload``, mixed into ``TrainingStateAverager`` and ``GroupSizedAverager``: a downloaded state is
  checked (``StateCheck``) before anyone takes it, inside hivemind's private ``_load_state_from_peers`` (the
  averager's process), which it wraps; the check for each download travels there through ``_outer_pipe``
  (``_arm_state_check``). A refused state raises where hivemind catches a failed peer, so hivemind's own loop goes on
  to the peer with the next priority.
- ``dht_node_validators`` reads a DHT node's ``record_validator._validators`` to count refused records
  (``core.records``).
- ``GroupSizedAverager``: a plain ``DecentralizedAverager`` with ``_GroupSized`` and ``_CheckedDownload`` (the DiLoCo
  rounds and state, ``core.diloco``).
- ``use_our_8bit_codec`` puts ``core.quantization.Blockwise8BitCompression`` into hivemind's private table of
  decoders, ``hivemind.compression.serialization._BASE_COMPRESSION_TYPES``, under the wire name ``UNIFORM_8BIT``.

The gradient averager's class and options reach hivemind through the public ``grad_averager_factory`` argument.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing as mp
import time
from collections.abc import Callable

import hivemind
import torch
from hivemind.compression import CompressionInfo
from hivemind.dht.validation import RecordValidatorBase
from hivemind.optim import grad_averager, state_averager
from hivemind.optim import optimizer as hivemind_optimizer
from hivemind.utils import get_dht_time

from vitpeer.peer.core.events import SwarmEvents, allreduce_bytes_sent
from vitpeer.peer.core.remote_state import StateCheck, StateRefused, download_bound, training_state_check

log = logging.getLogger(__name__)

# No Lightning and no timm here: ``core.records`` (which ``vitpeer doctor`` loads) imports this module.

WRITTEN_FOR = "1.1.12"
"""The hivemind version these adapters were written against and read with (a test pins the installed one to it)."""


class _LoadDeadline:
    """Wraps an averager's ``load_state_from_peers`` so hivemind's retry loop ends at a deadline.

    ``hivemind.Optimizer.load_state_from_peers`` retries forever while downloads fail (hivemind#453, #653). Before
    the deadline a failure propagates (hivemind retries); after it, the failure is logged and swallowed, so hivemind's
    loop ends and the peer goes on from its local state. Each attempt's own timeout is cut to the time left.

    ``arm`` starts a new download: its deadline is ``timeout`` after its first attempt, and every retry hivemind makes
    until the next ``arm`` shares it. A call without ``arm`` before it (a download outside ``SwarmOptimizer``) is a
    new download of its own.
    """

    def __init__(self, load_state_from_peers, timeout: float):
        self.load, self.timeout = load_state_from_peers, timeout
        self.deadline: float | None = None  # None: the next attempt begins a new download
        self.armed = False
        self.gave_up = False  # the last download ended at the deadline without a state

    def arm(self) -> None:
        """The next call begins a new download with the full ``timeout``."""
        self.deadline, self.armed, self.gave_up = None, True, False

    def __call__(self, **kwargs):
        now = time.monotonic()
        if self.deadline is None or not self.armed:
            self.deadline, self.gave_up = now + self.timeout, False
        kwargs["timeout"] = max(1.0, min(kwargs.get("timeout") or self.timeout, self.deadline - now))
        try:
            return self.load(**kwargs)
        except Exception as err:
            if time.monotonic() < self.deadline:
                raise
            log.warning("giving up loading state from peers after %.0f s (%r); training on", self.timeout, err)
            self.gave_up = True
            return None


class _CheckedResult:
    """Stands for hivemind's future in its download loop: a state that fails ``check`` raises where hivemind catches
    a failed peer, so hivemind tries the peer with the next priority; one that passes goes to ``future``."""

    def __init__(self, future, check: StateCheck | None, refused):
        self.future, self.check, self.refused = future, check, refused

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, result) -> None:
        if result is not None and self.check is not None:
            reason = self.check.refusal(*result)
            if reason is not None:
                with self.refused.get_lock():
                    self.refused.value += 1
                log.warning("refused a state from a peer: %s; trying the next peer", reason)
                raise StateRefused(reason)
        self.future.set_result(result)


class _CheckedDownload:
    """An averager that checks every state it downloads before handing it on (mixed into hivemind's averagers).

    hivemind's download (``DecentralizedAverager._load_state_from_peers``, in the averager's process) asks the peers
    in order of their announced priority and hands on the first state it receives, whatever it holds; its callers
    (``TrainingStateAverager.load_state_from_peers``, ``DiLoCo``, the coordinator) would then apply it. Here the
    state is checked in that loop, against the ``StateCheck`` that ``state_check`` (set by the owner, in this
    process) builds for each download, so a refused peer is skipped and the next one asked. ``refused_states``
    counts the refusals (a counter in shared memory, written in the averager's process)."""

    state_check: Callable[[], StateCheck | None] | None = None
    """Builds the check for the next download (in the host process, when the download begins)."""

    def __init__(self, *args, **kwargs):
        self._refused = mp.Value(ctypes.c_int, 0)  # before super() starts the averager's process: it is shared
        self._check: StateCheck | None = None  # the averager process's copy, armed for each download
        super().__init__(*args, **kwargs)

    @property
    def refused_states(self) -> int:
        """States refused since this averager started."""
        return self._refused.value

    def load_state_from_peers(self, *args, **kwargs):
        check = self.state_check() if self.state_check is not None else None
        # pipe messages run in order in the averager's process: the check is in place before the download begins
        self._outer_pipe.send(("_arm_state_check", [check], {}))
        return super().load_state_from_peers(*args, **kwargs)

    async def _arm_state_check(self, check: StateCheck | None) -> None:  # runs in the averager's process
        self._check = check

    async def _load_state_from_peers(self, future, timeout: float | None = None):  # runs in the averager's process
        await super()._load_state_from_peers(_CheckedResult(future, self._check, self._refused), timeout=timeout)


class _GroupSized:
    """A hivemind averager told how many peers a full group has (mixed into hivemind's two averager classes).

    Without a target group size, hivemind's matchmaking leader keeps its group open for the whole
    ``matchmaking_time`` even when every peer has joined, so every swarm step waited that long for nothing. With the
    size set to the peers the progress tracker counts, the group closes as soon as they are all in; when a counted
    peer is gone (its record not yet expired), the group closes at ``matchmaking_time`` as before. Matchmaking runs
    in the averager's own process: the size travels there through hivemind's command pipe.
    """

    group_size: int | None = None

    def set_group_size(self, size: int) -> None:
        if size != self.group_size:
            self.group_size = size
            # hivemind's averager process runs ``getattr(averager, name)(*args, **kwargs)`` for each pipe message
            self._outer_pipe.send(("_set_group_size", [size], {}))

    async def _set_group_size(self, size: int) -> None:  # runs in the averager's process
        # hivemind fixes the size when the averager starts (``target_group_size``, None for hivemind.Optimizer's
        # averagers) and offers no setter: change it on the live matchmaking, where the leader checks it
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size


# hivemind names each averager's RPC protocols after its class (``<prefix>::TrainingStateAverager.rpc_download_state``):
# ours keep hivemind's class names, so they speak with plain hivemind peers and the coordinator.


class GradientAverager(_GroupSized, grad_averager.GradientAverager):
    """hivemind's gradient averager, with ``_GroupSized``."""


class TrainingStateAverager(_GroupSized, _CheckedDownload, state_averager.TrainingStateAverager):
    """hivemind's training-state averager, with ``_GroupSized`` and ``_CheckedDownload``."""


class GroupSizedAverager(_GroupSized, _CheckedDownload, hivemind.DecentralizedAverager):
    """hivemind's plain averager, with ``_GroupSized`` and ``_CheckedDownload``."""


def use_our_8bit_codec() -> None:
    """Encode and decode ``UNIFORM_8BIT`` tensors with ``core.quantization.Blockwise8BitCompression``.

    hivemind decodes every received tensor through a module-level table keyed by the wire name, and the protocol has
    no room for a new name; hivemind's own 8-bit decoders fail under numpy 2 (see ``core.quantization``). Call it
    before any averager process starts (they fork from this one and inherit the table).
    """
    from hivemind.compression import serialization

    from vitpeer.peer.core.quantization import Blockwise8BitCompression

    serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Blockwise8BitCompression()


def catch_up_scheduler(averager: state_averager.TrainingStateAverager) -> None:
    """Step ``averager``'s LR scheduler until it is in step with ``averager.local_epoch``.

    Use it after setting the epoch by hand (a checkpoint restore). hivemind does this itself after a state download,
    in the private ``_update_scheduler``, and has no public way to do it otherwise."""
    averager._update_scheduler()


def dht_node_validators(node) -> list[RecordValidatorBase]:
    """The record validators a running ``DHTNode`` applies (run inside the DHT process, e.g. by
    ``hivemind.DHT.run_coroutine``). hivemind keeps no public accessor: its composite validator's private list."""
    return list(node.protocol.record_validator._validators)


def say_goodbye(dht: hivemind.DHT, tracker) -> None:
    """Tell the others this peer is gone: its progress record set to None, and wait until it is stored.

    hivemind's own goodbye (in ``shutdown``) does not wait for the store, so a DHT shut down right after loses it, and
    the others count this peer, and wait for it in their rounds, until its record expires."""
    expiration = get_dht_time() + tracker.metadata_expiration
    try:
        # the record hivemind's own goodbye writes: peers' progress is keyed by their signing key, kept private
        dht.store(tracker.training_progress_key, None, expiration, subkey=tracker._local_public_key)
    except Exception as err:  # the goodbye is a courtesy: leaving must not fail on it
        log.warning("could not tell the swarm this peer left: %r", err)


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer with a deadline on state downloads, a check of every downloaded state, checkpoint restore
    that keeps the LR in step, a guard that keeps non-finite gradients out of the swarm, and ``SwarmEvents`` for
    rounds, downloads and skipped batches.

    ``max_steps``: the run's last swarm step (``trainer.max_steps``); no downloaded state may be past it."""

    def __init__(self, events: SwarmEvents | None = None, max_steps: int | None = None, **kwargs):
        self.events = events or SwarmEvents()
        self.max_steps = max_steps
        if not kwargs.get("use_local_updates"):  # hivemind refuses a gradient averager factory with local updates
            # hivemind 1.1.12 forwards averager_opts to the state averager only, though its docstring says both: the
            # gradient averager kept request_timeout = 3 s against a shorter matchmaking_time, which hivemind itself
            # warns "can cause deadlocks" (a demo peer pair once failed every gradient round for 56 rounds so). The
            # public factory argument carries them, and our averager class, to the gradient averager.
            factory = kwargs.get("grad_averager_factory") or GradientAverager
            kwargs["grad_averager_factory"] = functools.partial(factory, **dict(kwargs.get("averager_opts") or {}))
        super().__init__(**kwargs)
        self._loaders = []
        for averager in (self.state_averager, self.grad_averager):
            if averager is not None:
                loader = _LoadDeadline(averager.load_state_from_peers, self.load_state_timeout)
                averager.load_state_from_peers = loader
                self._loaders.append(loader)
        self.skipped_batches = 0
        """Local batches whose gradients held NaN or Inf and were not sent (see ``_check_and_accumulate_gradients``)."""
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

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        # Changes which class hivemind builds its state averager from: ours, with ``_GroupSized``. hivemind 1.1.12's
        # Optimizer takes a factory for the gradient averager (used above) but none for the state averager: its
        # ``_make_state_averager`` calls this module-level name, with the arguments it alone knows. Copying that call
        # here would drift silently from hivemind's, and changing the class after it is built is too late (the
        # averager's process has started with hivemind's class, and ``_set_group_size`` runs there). So the name is
        # lent for this call and restored; not thread-safe: build one SwarmOptimizer at a time.
        hivemind_optimizer.TrainingStateAverager = TrainingStateAverager
        try:
            return super()._make_state_averager(**kwargs)
        finally:
            hivemind_optimizer.TrainingStateAverager = state_averager.TrainingStateAverager

    def _maybe_schedule_gradient_averaging(self) -> None:
        if self.tracker.global_progress.num_peers <= 1:
            # alone, hivemind pre-schedules a round only to cancel it when the step comes ("no other peers"); a cancel
            # that landed while a joining peer was matching with this averager once left its matchmaking broken for
            # the rest of the run (test_prometheus.py, 1 run in 6: neither peer averaged again)
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
        grads = [param.grad for param in self.state_averager.main_parameters if param.grad is not None]
        if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            return False
        self.skipped_batches += 1
        log.warning(
            "non-finite gradients (NaN or Inf) in a local batch at swarm step %d: not sent to the swarm "
            "(%d such batches so far); check the learning rate, the data and the precision",
            self.local_epoch,
            self.skipped_batches,
        )
        self.events.batch_skipped("nonfinite")
        return True

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
        compression = self.grad_averager.allreduce_kwargs["compression"]
        ratio = compression.estimate_compression_ratio
        # one averaged gradient per parameter, of its shape and dtype
        return sum(
            p.numel() * p.element_size() * ratio(CompressionInfo.from_tensor(p)) for p in self.grad_averager.parameters
        )

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
        self.events.state_download(outcome, seconds)
        self.events.waited(seconds)  # the training thread downloads: it cannot compute meanwhile

    def shutdown(self) -> None:
        super().shutdown()
        self.say_goodbye()

    def say_goodbye(self) -> None:
        say_goodbye(self.dht, self.tracker)

    # What the strategy asks of a swarm optimizer, whichever the algorithm (``core.diloco.DiLoCoOptimizer`` too):

    def prepare_last_step(self, max_steps: int) -> None:
        """The last swarm step ends with a state round whatever ``average_state_every`` says, so every peer's last
        checkpoint holds the swarm's common parameters (hivemind decides by the step's number as it begins)."""
        self.average_state_every = 1

    def finish_pending(self) -> None:
        """Wait for the background state round (and, with ``overlap``, the optimizer step) still in flight and
        apply its result to the parameters."""
        self.state_averager.step(wait_for_delayed_updates=True)

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
