"""HivemindStrategy: Lightning 2.6 trains one peer of a hivemind swarm.

How one local step reaches the swarm (read top to bottom):
1. Lightning runs ``training_step`` + backward inside the optimizer closure, as for any optimizer.
2. ``optimizer_step`` hands the closure and this step's batch size to ``hivemind.Optimizer.step``. hivemind adds the
   gradients to a local accumulator and reports the samples to the DHT.
3. When the peers' reports add up to ``target_batch_size``, every peer averages its accumulated gradients with the
   others (all-reduce) and applies one optimizer step: one *swarm step* (hivemind's epoch). With ``overlap`` the
   averaging and the optimizer run in background threads while the next batches compute.
4. ``_SwarmProgress`` sets Lightning's ``global_step`` to the swarm step after every local step, so ``max_steps``,
   checkpoints and the logged ``epoch`` count swarm steps; hivemind steps the LR scheduler once per swarm step.

The module's optimizer and scheduler are rebuilt inside hivemind (the factory form that background modes need): any
torch optimizer class with its defaults and parameter groups, and a ``LambdaLR`` (a pure function of the step, so
peers that joined at different times agree on the learning rate).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import hivemind
import pytorch_lightning as pl
import torch
from hivemind.compression import Float16Compression, NoCompression
from hivemind.optim import grad_averager, state_averager
from hivemind.optim import optimizer as hivemind_optimizer
from hivemind.utils import get_dht_time
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities.data import extract_batch_size
from torch.distributed.tensor import distribute_tensor
from torch.optim.lr_scheduler import LambdaLR

from vitpeer.peer.core.config import SwarmConfig
from vitpeer.peer.core.parallel import check_precision

log = logging.getLogger(__name__)

COMPRESSION = {"none": NoCompression, "fp16": Float16Compression}  # 8bit: refused by SwarmConfig


class _LoadDeadline:
    """Wraps an averager's ``load_state_from_peers`` so hivemind's retry loop ends at a deadline.

    ``hivemind.Optimizer.load_state_from_peers`` retries forever while downloads fail (hivemind#453, #653). Before
    the deadline a failure propagates (hivemind retries); after it, the failure is logged and swallowed, so hivemind's
    loop ends and the peer goes on from its local state. Each attempt's own timeout is cut to the time left.
    """

    def __init__(self, load_state_from_peers, timeout: float):
        self.load, self.timeout = load_state_from_peers, timeout
        self.deadline: float | None = None
        self.gave_up = False  # the last load ended at the deadline without a state

    def __call__(self, **kwargs):
        now = time.monotonic()
        if self.deadline is None or now > self.deadline + self.timeout:  # a new load, not a retry of the last one
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
            self._outer_pipe.send(("_set_group_size", [size], {}))

    async def _set_group_size(self, size: int) -> None:  # runs in the averager's process
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size


# hivemind names each averager's RPC protocols after its class (``<prefix>::TrainingStateAverager.rpc_download_state``):
# ours keep hivemind's class names, so they speak with plain hivemind peers and the coordinator.


class GradientAverager(_GroupSized, grad_averager.GradientAverager):
    """hivemind's gradient averager, with ``_GroupSized``."""


class TrainingStateAverager(_GroupSized, state_averager.TrainingStateAverager):
    """hivemind's training-state averager, with ``_GroupSized``."""


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer with a deadline on state downloads, checkpoint restore that keeps the LR in step, a guard
    that keeps non-finite gradients out of the swarm, and ``SwarmEvents`` for rounds, downloads and skipped batches."""

    def __init__(self, events: SwarmEvents | None = None, **kwargs):
        self.events = events or SwarmEvents()
        self._averager_opts = dict(kwargs.get("averager_opts") or {})
        super().__init__(**kwargs)
        self._loaders = []
        for averager in (self.state_averager, self.grad_averager):
            if averager is not None:
                loader = _LoadDeadline(averager.load_state_from_peers, self.load_state_timeout)
                averager.load_state_from_peers = loader
                self._loaders.append(loader)
        self.skipped_batches = 0
        """Local batches whose gradients held NaN or Inf and were not sent (see ``_check_and_accumulate_gradients``)."""
        self.parameters_version = 0
        """Bumped whenever hivemind writes this peer's parameters: an optimizer step, a (background) averaging result
        applied at any later local step, a state download. Local ranks that follow this peer sync when it moves."""
        state = self.state_averager
        for name in ("_apply_optimizer_parameters_", "_apply_averaging_results_", "load_state_from_peers"):
            setattr(state, name, self._bumps_version(getattr(state, name)))

    def _bumps_version(self, writes_parameters):
        def wrapped(*args, **kwargs):
            try:
                return writes_parameters(*args, **kwargs)
            finally:
                self.parameters_version += 1

        return wrapped

    def _make_gradient_averager(self, factory, **kwargs):
        # hivemind 1.1.12 forwards averager_opts to the state averager only, though its docstring says both: the
        # gradient averager kept request_timeout = 3 s against a shorter matchmaking_time, which hivemind itself
        # warns "can cause deadlocks" (a demo peer pair once failed every gradient round for 56 rounds so).
        return super()._make_gradient_averager(factory or GradientAverager, **{**self._averager_opts, **kwargs})

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        # hivemind builds it by this module-level name, with the arguments it alone knows: lend it our subclass
        hivemind_optimizer.TrainingStateAverager = TrainingStateAverager
        try:
            return super()._make_state_averager(**kwargs)
        finally:
            hivemind_optimizer.TrainingStateAverager = state_averager.TrainingStateAverager

    def _maybe_schedule_gradient_averaging(self) -> None:
        self._size_groups(self.grad_averager)  # before the round is scheduled: see ``_GroupSized``
        super()._maybe_schedule_gradient_averaging()

    def _maybe_schedule_state_averaging(self) -> None:
        self._size_groups(self.state_averager)
        super()._maybe_schedule_state_averaging()

    def _size_groups(self, averager) -> None:
        if isinstance(averager, _GroupSized):
            averager.set_group_size(max(2, self.tracker.global_progress.num_peers))

    # The two hooks below wrap hivemind 1.1.12's own steps (private names, pinned version) without changing them.

    def _check_and_accumulate_gradients(self, batch_size: int, grad_scaler) -> bool:
        # The poison guard. One NaN in what a peer sends turns the whole swarm's average, and so every peer's
        # parameters, into NaN. A batch with non-finite gradients is left out of this peer's accumulator (the good
        # ones gathered before stay), its samples are not reported, and the step goes on: this peer still takes part
        # in the round with what it has, so it stays in step with the swarm.
        grads = [param.grad for param in self.state_averager.main_parameters if param.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            self.skipped_batches += 1
            log.warning(
                "non-finite gradients (NaN or Inf) in a local batch at swarm step %d: not sent to the swarm "
                "(%d such batches so far); check the learning rate, the data and the precision",
                self.local_epoch,
                self.skipped_batches,
            )
            self.events.batch_skipped("nonfinite")
            return True
        return super()._check_and_accumulate_gradients(batch_size, grad_scaler)

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
        # hivemind swallows a failed or timed-out round and steps with local gradients; the future tells which
        control = maybe_step_control
        averaged = control.done() and not control.cancelled() and control.exception() is None
        self.events.averaging_round("averaged" if averaged else "failed", time.perf_counter() - started)

    def load_state_from_peers(self, **kwargs) -> None:
        started, before = time.perf_counter(), self.local_epoch
        super().load_state_from_peers(**kwargs)
        if any(loader.gave_up for loader in self._loaders):
            outcome = "failed"
        else:
            outcome = "loaded" if self.local_epoch > before else "current"
        self.events.state_download(outcome, time.perf_counter() - started)

    def shutdown(self) -> None:
        super().shutdown()
        self.say_goodbye()

    def say_goodbye(self) -> None:
        """Tell the others this peer is gone: its progress record set to None, and wait until it is stored.

        hivemind's own goodbye (in ``shutdown``) does not wait for the store, so a DHT shut down right after loses
        it, and the others count this peer, and wait for it in their rounds, until its record expires."""
        tracker = self.tracker
        expiration = get_dht_time() + tracker.metadata_expiration
        try:
            self.dht.store(tracker.training_progress_key, None, expiration, subkey=tracker._local_public_key)
        except Exception as err:  # the goodbye is a courtesy: leaving must not fail on it
            log.warning("could not tell the swarm this peer left: %r", err)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # an offloaded optimizer reads the same .grad tensors every step: zero them, never replace them
        super().zero_grad(set_to_none=set_to_none and not self.offload_optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.state_averager._update_scheduler()  # hivemind's own catch-up: scheduler steps == local_epoch
        self.tracker.report_local_progress(self.local_epoch, samples_accumulated=0)


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
        lambda params: type(optimizer)(params),
        (lambda opt: LambdaLR(opt, lambdas)) if lambdas is not None else None,
    )


class _FollowerOptimizer(torch.optim.Optimizer):
    """A following rank's optimizer: it runs the closure (forward, backward, and DDP's all-reduce in backward) and
    changes nothing. The leader's hivemind step moves the parameters; the broadcast after it reaches this rank."""

    def __init__(self, param_groups: list[dict]):
        super().__init__([{"params": group["params"]} for group in param_groups], {})

    def step(self, closure=None, **_: Any):
        with torch.enable_grad():
            return closure() if closure is not None else None

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # a checkpoint's optimizer state belongs to the leader's swarm optimizer


class _SwarmSteps:
    """The swarm logic of ``HivemindStrategy`` (one device) and ``HivemindDDPStrategy`` (N local ranks, one peer).

    Local rank 0, the *leader*, holds the ``SwarmOptimizer`` and talks to the swarm. With several local ranks, why
    every rank ends each step with the leader's parameters:

    1. The closure runs on every rank; DDP's backward all-reduces the gradients, so every rank's ``.grad`` is the
       mean over all ranks' samples.
    2. Only the leader hands them to hivemind, with ``batch_size`` = samples of all ranks: the swarm sees one peer
       contributing N x batch per local step. Followers step nothing (``_FollowerOptimizer``).
    3. After every local step the leader broadcasts its swarm epoch and ``parameters_version``, which counts every
       write hivemind makes to its parameters (an optimizer step, a background averaging result applied at a later
       local step, a state download). When the version moved, all parameters and buffers follow. No rank changes a
       parameter otherwise, so all ranks hold identical full parameters after every local step, the leader's.
    4. Every rank sets Lightning's step counter from that broadcast epoch, so all stop together at ``max_steps``
       and none waits alone in a collective; the broadcast also carries the leader's ``leave`` (a signal), so all
       ranks stop at the same step then too.
    """

    def _init_swarm(self, swarm: SwarmConfig, dht: hivemind.DHT | None, events: SwarmEvents | None) -> None:
        self.swarm, self.dht, self.events = swarm, dht, events
        self._batch_size: int | None = None
        self._followed_epoch = self._followed_version = -1
        self.leave = threading.Event()
        """Set (by ``core.leave.LeaveOnSignal``) to stop after the current local step; the leader's decides."""

    @property
    def leader(self) -> bool:
        return self.local_rank == 0

    @property
    def optimizer(self) -> SwarmOptimizer:
        return self.optimizers[0]

    @property
    def swarm_epoch(self) -> int:
        """The swarm step this rank is at: the leader's optimizer's, as last broadcast to followers."""
        return self.optimizer.local_epoch if self.leader else self._followed_epoch

    def setup(self, trainer: pl.Trainer) -> None:
        check_precision(trainer.precision, self.root_device.type, swarm=True)
        if self.world_size > 1 and self.swarm.overlap:
            raise ValueError(
                "swarm.overlap applies parameter updates in the background, after the step the other local ranks "
                "follow; use it with one device per peer (parallel.strategy = 'single')"
            )
        if self.swarm.overlap and self.leader:
            log.warning(
                "swarm.overlap is experimental: in our 2-peer runs the swarm did not learn with it (README, known "
                "limits); train without --overlap unless you are working on it"
            )
        super().setup(trainer)
        if trainer.state.fn == "fit":
            self._prepare_swarm_parameters()
            if self.leader:
                self.optimizers = [self._make_swarm_optimizer(trainer)]
            else:
                self.optimizers = [_FollowerOptimizer(self._follower_groups())]
            self.lr_scheduler_configs = []  # hivemind steps the scheduler once per swarm step, Lightning must not
            trainer.callbacks.append(_SwarmProgress())

    def _make_swarm_optimizer(self, trainer: pl.Trainer) -> SwarmOptimizer:
        if len(self.optimizers) != 1:
            raise ValueError(f"HivemindStrategy trains with exactly one optimizer, got {len(self.optimizers)}")
        if len(self.lr_scheduler_configs) > 1:
            raise ValueError("HivemindStrategy takes at most one LR scheduler")
        scheduler = self.lr_scheduler_configs[0].scheduler if self.lr_scheduler_configs else None
        params, optimizer, scheduler_factory = factory_form(self.optimizers[0], scheduler)
        params = self._swarm_groups(params)
        swarm = self.swarm
        return SwarmOptimizer(
            events=self.events,
            dht=self.dht,
            run_id=swarm.run_id,
            target_batch_size=swarm.target_batch_size,
            params=params,
            optimizer=optimizer,
            scheduler=scheduler_factory,
            matchmaking_time=swarm.matchmaking_time,
            average_state_every=swarm.average_state_every,
            averaging_timeout=swarm.averaging_timeout,
            load_state_timeout=swarm.load_state_timeout,
            use_local_updates=swarm.local_updates,
            offload_optimizer=not swarm.local_updates,
            delay_optimizer_step=swarm.overlap,
            delay_grad_averaging=swarm.overlap,
            grad_compression=COMPRESSION[swarm.compression](),
            state_averaging_compression=COMPRESSION[swarm.compression](),
            # matchmaking requests must time out before the matchmaking window closes (hivemind warns otherwise)
            averager_opts={"request_timeout": min(3.0, swarm.matchmaking_time / 2)},
            tracker_opts={"metadata_expiration": swarm.progress_expiration},  # re-reported every half of it
            verbose=log.isEnabledFor(logging.DEBUG),
        )

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.leader and self.swarm.initial_peers:
            self.load_state_from_peers()
        self._follow_leader(force=True)

    def load_state_from_peers(self) -> bool:
        """Download the swarm's current state within ``load_state_timeout``; True if it moved this peer forward."""
        before = self.optimizer.local_epoch
        started = time.monotonic()
        self.optimizer.load_state_from_peers()
        after = self.optimizer.local_epoch
        if after != before:
            log.info("loaded the swarm's state at step %d in %.1f s", after, time.monotonic() - started)
        return after != before

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_size = extract_batch_size(batch)  # known before the closure runs inside hivemind's step
        super().on_train_batch_start(batch, batch_idx)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any):
        # hivemind counts samples, not steps, toward target_batch_size: this local step's samples on all ranks
        kwargs["batch_size"] = self._batch_size * self.world_size
        max_steps = self.lightning_module.trainer.max_steps
        if self.leader and self.optimizer.local_epoch + 1 >= max_steps and not self.leave.is_set():
            # the last swarm step ends with a state round whatever ``average_state_every`` says, so every peer's last
            # checkpoint holds the swarm's common parameters (hivemind decides by the step's number as it begins)
            self.optimizer.average_state_every = 1
        result = super().optimizer_step(optimizer, self._hand_gradients(closure), model, **kwargs)
        if self.leader and self.optimizer.local_epoch >= max_steps:
            self._apply_pending_updates()  # before the last checkpoint and the test see these parameters
        self._follow_leader()
        return result

    @property
    def _swarm_optimizer(self) -> SwarmOptimizer | None:
        """The leader's hivemind optimizer once fit has made it; None on followers and before."""
        found = self.optimizers[0] if self.optimizers else None
        return found if isinstance(found, SwarmOptimizer) else None

    def stop_averaging_state(self) -> None:
        """Leaving (``core.leave``, from a helper thread): start no more state-averaging rounds. The gradient round
        in flight goes on, so the others, who wait for this peer's part, lose nothing."""
        if (optimizer := self._swarm_optimizer) is not None:
            optimizer.average_state_every = 2**31  # hivemind averages state when the next epoch divides by it

    def say_goodbye(self) -> None:
        """Leaving past the deadline (``core.leave``, from a helper thread): tell the swarm, without waiting for
        the training loop."""
        if (optimizer := self._swarm_optimizer) is not None:
            optimizer.say_goodbye()

    def _apply_pending_updates(self) -> None:
        """The leader: wait for hivemind's background state-averaging round (and, with ``overlap``, the optimizer
        step) still in flight and apply its result to the parameters."""
        self.optimizer.state_averager.step(wait_for_delayed_updates=True)

    def _follow_leader(self, force: bool = False) -> None:
        """Every rank: take the leader's swarm epoch and, when its parameters moved (or ``force``), the parameters."""
        if self.world_size == 1:
            self._followed_epoch = self.optimizer.local_epoch
            leaving = self.leave.is_set()
        else:
            mine = [self.optimizer.local_epoch, self.optimizer.parameters_version] if self.leader else [0, 0]
            state = torch.tensor([*mine, int(self.leave.is_set())], device=self.root_device)
            torch.distributed.broadcast(state, src=0)
            epoch, version, leaving = (int(value) for value in state.tolist())
            if force or version != self._followed_version:
                with torch.no_grad():
                    self._sync_parameters()
            self._followed_epoch, self._followed_version = epoch, version
        if leaving:
            self.lightning_module.trainer.should_stop = True

    # --- where the strategies differ: what hivemind optimizes, how gradients reach it, how ranks follow ----------

    def _prepare_swarm_parameters(self) -> None:
        """Every rank, before the optimizers are made."""

    def _swarm_groups(self, groups: list[dict]) -> list[dict]:
        """The parameter groups hivemind optimizes (the leader's): the module's own."""
        return groups

    def _follower_groups(self) -> list[dict]:
        return self.optimizers[0].param_groups

    def _hand_gradients(self, closure):
        """The closure hivemind runs: forward and backward leave the gradients where it reads them."""
        return closure

    def _sync_parameters(self) -> None:
        """Every rank: the leader's parameters and buffers, by broadcast."""
        module = self.lightning_module
        for tensor in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        checkpoint["swarm_epoch"] = self.swarm_epoch  # also inside the optimizer state; here for readers
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def on_train_end(self) -> None:
        if self.leader:  # ended before max_steps (max_epochs): apply what is in flight for the test (the last
            # checkpoint is already written: callbacks' on_train_end runs before the strategy's)
            self._apply_pending_updates()
        self._follow_leader(force=True)
        super().on_train_end()

    def teardown(self) -> None:
        if (optimizer := self._swarm_optimizer) is not None and optimizer.is_alive():
            optimizer.shutdown()  # teardown runs after fit and again after test
        super().teardown()


class HivemindStrategy(_SwarmSteps, SingleDeviceStrategy):
    """One hivemind peer on one device. ``dht`` is a started ``hivemind.DHT`` (see ``core.swarm.start_dht``)."""

    strategy_name = "hivemind"

    def __init__(
        self,
        swarm: SwarmConfig,
        dht: hivemind.DHT,
        device: torch.device | str = "cpu",
        events: SwarmEvents | None = None,
        **kwargs: Any,
    ):
        super().__init__(device=torch.device(device), **kwargs)
        self._init_swarm(swarm, dht, events)


class HivemindDDPStrategy(_SwarmSteps, DDPStrategy):
    """One hivemind peer made of this host's N devices (``Trainer(devices=N)``): DDP inside the host, local rank 0
    talks to the swarm (see ``_SwarmSteps``). ``dht`` is the leader's started DHT; None on the other ranks."""

    strategy_name = "hivemind_ddp"

    def __init__(self, swarm: SwarmConfig, dht: hivemind.DHT | None, events: SwarmEvents | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_swarm(swarm, dht, events)


class HivemindFSDPStrategy(_SwarmSteps, ModelParallelStrategy):
    """One hivemind peer made of this host's N devices with FSDP2: each rank holds 1/N of every parameter and
    gradient (``ImageClassifier.configure_model`` shards the network), while the swarm averages the whole model.

    Why it is correct, in addition to ``_SwarmSteps``:

    1. After backward FSDP has reduce-scattered the gradients: each rank's shard holds the mean over all ranks.
    2. Right after the closure every rank takes part in gathering each full gradient (``DTensor.full_tensor``); the
       leader copies them into its *replica*, a full-size host-memory copy of the parameters, which is what its
       hivemind optimizer averages and steps (hivemind keeps the optimizer state in host memory for every peer).
       The shards' gradients are then cleared: no rank ever steps them.
    3. When the leader's parameters move (``parameters_version``), every rank takes its shard of the leader's
       replica (``distribute_tensor`` scatters from rank 0) into its local shard. No rank changes a shard otherwise.

    So device memory holds 1/N of the parameters and gradients per rank, and no optimizer state at all; the
    leader's host memory holds the full replica, its gradients and the optimizer state. Gradient clipping is
    applied to the full gradient on the replica. Resuming from a checkpoint is not supported yet.
    """

    strategy_name = "hivemind_fsdp"

    def __init__(self, swarm: SwarmConfig, dht: hivemind.DHT | None, devices: int, events: SwarmEvents | None = None):
        super().__init__(data_parallel_size=devices, tensor_parallel_size=1, save_distributed_checkpoint=False)
        self._init_swarm(swarm, dht, events)
        self._shards: list[torch.nn.Parameter] = []
        self._replicas: list[torch.Tensor] = []

    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.ckpt_path is not None:
            raise ValueError("resuming a peer with parallel.strategy = 'fsdp' is not supported yet; use 'ddp'")
        super().setup(trainer)

    def _prepare_swarm_parameters(self) -> None:
        self._shards = [param for group in self.optimizers[0].param_groups for param in group["params"]]
        fulls = [shard.full_tensor() for shard in self._shards]  # a collective: every rank takes part
        if self.leader:
            self._replicas = [full.detach().to("cpu", copy=True).requires_grad_(True) for full in fulls]

    def _swarm_groups(self, groups: list[dict]) -> list[dict]:
        replica_of = {id(shard): replica for shard, replica in zip(self._shards, self._replicas, strict=True)}
        return [{**group, "params": [replica_of[id(param)] for param in group["params"]]} for group in groups]

    def _follower_groups(self) -> list[dict]:
        return [{"params": [torch.zeros(1, requires_grad=True)]}]  # a follower steps nothing, clips nothing

    def _hand_gradients(self, closure):
        def closure_and_gather():
            loss = closure()
            for index, shard in enumerate(self._shards):
                full = shard.grad.full_tensor() if shard.grad is not None else None  # every rank takes part
                if self.leader:
                    self._replicas[index].grad = None if full is None else full.to("cpu")
                shard.grad = None
            clip = self.lightning_module.trainer.gradient_clip_val
            if self.leader and clip:
                torch.nn.utils.clip_grad_norm_(self._replicas, clip)
            return loss

        return closure_and_gather

    def _sync_parameters(self) -> None:
        for index, shard in enumerate(self._shards):
            if self.leader:
                full = self._replicas[index].detach().to(self.root_device)
            else:
                full = torch.empty(shard.shape, dtype=shard.dtype, device=self.root_device)
            scattered = distribute_tensor(full, shard.device_mesh, shard.placements, src_data_rank=0)
            shard.to_local().copy_(scattered.to_local())
        for buffer in self.lightning_module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict() if self.leader else {}  # the leader's swarm optimizer, over its replica


class _SwarmProgress(pl.Callback):
    """Keeps Lightning's step counter on the swarm step, logs the swarm's numbers, prints a line per swarm step."""

    def __init__(self):
        self.shown_epoch = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        strategy: _SwarmSteps = trainer.strategy
        step = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
        step.ready = step.completed = strategy.swarm_epoch  # global_step, max_steps and checkpoints: swarm steps
        if not strategy.leader:
            return
        opt = strategy.optimizer
        progress = opt.tracker.global_progress
        if opt.local_epoch != self.shown_epoch:
            self.shown_epoch = opt.local_epoch
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float("nan")
            log.info(
                "swarm step %d/%d | peers %d | loss %.4f | this peer %.0f samples/s | lr %.2e",
                opt.local_epoch,
                trainer.max_steps,
                max(1, progress.num_peers),
                loss,
                opt.local_progress.samples_per_second,
                opt.opt.param_groups[0]["lr"],
            )
        pl_module.log_dict(
            {
                "epoch": float(opt.local_epoch),
                "swarm/peers": float(progress.num_peers),
                "swarm/samples_accumulated": float(progress.samples_accumulated),
                "swarm/samples_per_second": float(opt.local_progress.samples_per_second),
                "lr": float(opt.opt.param_groups[0]["lr"]),
            },
            on_step=True,
            on_epoch=False,
            rank_zero_only=True,
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log("epoch", float(trainer.strategy.swarm_epoch), sync_dist=False)
