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

Where the rest lives: the ``hivemind.Optimizer`` the strategy steps, ``SwarmOptimizer``, with everything that touches
hivemind's private names, is in ``core.averaging.hivemind_averagers``; the events it reports, in
``core.averaging.events``; a peer made
of several local ranks (DDP, FSDP), in ``core.lightning.local_ranks``, built on ``SwarmSteps`` below.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import hivemind
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import SingleDeviceStrategy, Strategy
from pytorch_lightning.utilities.data import extract_batch_size

from vitpeer.peer.core.algorithms.base import PeerOptimizer, PeerSetup
from vitpeer.peer.core.averaging.events import SwarmEvents
from vitpeer.peer.core.averaging.hivemind_averagers import use_our_8bit_codec
from vitpeer.peer.core.config import SwarmConfig, algorithm_named
from vitpeer.peer.core.model.parallel import check_precision

log = logging.getLogger(__name__)


def last_step(trainer: pl.Trainer) -> int | None:
    """The run's last swarm step, ``trainer.max_steps``; None when it has none (Lightning's -1)."""
    return trainer.max_steps if trainer.max_steps >= 0 else None


class SwarmSteps(Strategy if TYPE_CHECKING else object):
    """The swarm logic of every vitpeer strategy: ``HivemindStrategy`` below (one device) and, through
    ``core.lightning.local_ranks.LocalRanks``, ``HivemindDDPStrategy`` and ``HivemindFSDPStrategy`` (N local ranks,
    one peer).

    Local rank 0, the *leader*, holds the ``SwarmOptimizer`` and talks to the swarm; on one device it is the only
    rank. After every local step every rank takes the leader's swarm epoch (``_follow_leader``), which
    ``_SwarmProgress`` turns into Lightning's step counter, and stops when the leader leaves (``leave``). How
    following ranks end each step with the leader's parameters is explained in ``core.lightning.local_ranks``.

    A mixin of Lightning strategies: checkers see it on Lightning's ``Strategy``, so what it uses of the strategy it
    is mixed into, and its ``super()`` calls, are checked; at run time that strategy comes after it in the MRO.
    """

    # every Lightning strategy has these (a single device's as plain attributes), but Strategy declares neither
    if TYPE_CHECKING:

        @property
        def local_rank(self) -> int: ...

        @property
        def world_size(self) -> int: ...

    def _init_swarm(self, swarm: SwarmConfig, dht: hivemind.DHT | None, events: SwarmEvents | None) -> None:
        self.swarm, self.dht, self.events = swarm, dht, events
        self._batch_size: int | None = None
        self._followed_epoch = -1
        self.peer_optimizer: PeerOptimizer | None = None  # the leader's, once fit has made it
        self.leave = threading.Event()
        """Set (by ``core.lightning.leave.LeaveOnSignal``) to stop after the current local step; the leader's
        decides."""

    @property
    def leader(self) -> bool:
        return self.local_rank == 0

    @property
    def optimizer(self) -> PeerOptimizer:
        """The leader's swarm optimizer (``setup`` made it)."""
        if self.peer_optimizer is None:
            raise RuntimeError("only the leader has a swarm optimizer, made when fit sets up")
        return self.peer_optimizer

    @property
    def swarm_epoch(self) -> int:
        """The swarm step this rank is at: the leader's optimizer's, as last broadcast to followers."""
        return self.optimizer.local_epoch if self.leader else self._followed_epoch

    @property
    def _module(self) -> pl.LightningModule:
        """The module being trained: the swarm hooks run only while a Trainer fits or tests one."""
        module = self.lightning_module
        if module is None:
            raise RuntimeError("the strategy has no LightningModule: a Trainer connects it when it fits one")
        return module

    def setup(self, trainer: pl.Trainer) -> None:
        check_precision(trainer.precision, self.root_device.type, swarm=True)
        if self.world_size > 1 and self.swarm.overlap:
            raise ValueError(
                "swarm.overlap applies parameter updates in the background, after the step the other local ranks "
                "follow; use it with one device per peer (parallel.strategy = 'single')"
            )
        if self.swarm.overlap and self.leader:
            log.warning(
                "swarm.overlap is experimental: a swarm does not learn with it yet (README, known "
                "limits); train without --overlap unless you are working on it"
            )
        use_our_8bit_codec()  # before any averager process forks: they decode what peers send with it
        super().setup(trainer)
        if trainer.state.fn == "fit":
            self._prepare_swarm_parameters()
            if self.leader:
                self.optimizers = [self._make_swarm_optimizer(trainer)]
            else:
                self.optimizers = [self._follower_optimizer()]
            self.lr_scheduler_configs = []  # hivemind steps the scheduler once per swarm step, Lightning must not
            trainer.callbacks.append(_SwarmProgress())  # pyright: ignore[reportAttributeAccessIssue]  # Lightning's callback connector sets it; Trainer does not declare it

    def _make_swarm_optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer:
        """The run's algorithm (``swarm.algorithm``) makes this peer's swarm optimizer from the module's own."""
        if len(self.optimizers) != 1:
            raise ValueError(f"HivemindStrategy trains with exactly one optimizer, got {len(self.optimizers)}")
        if len(self.lr_scheduler_configs) > 1:
            raise ValueError("HivemindStrategy takes at most one LR scheduler")
        scheduler = self.lr_scheduler_configs[0].scheduler if self.lr_scheduler_configs else None
        peer = PeerSetup(self.swarm, self.dht, self.events or SwarmEvents(), last_step(trainer), self._swarm_groups)
        optimizer = algorithm_named(self.swarm.algorithm).make_optimizer(peer, self.optimizers[0], scheduler)
        if not isinstance(optimizer, torch.optim.Optimizer):  # Lightning steps, saves and restores it as one
            raise TypeError(
                f"swarm.algorithm {self.swarm.algorithm!r} made a {type(optimizer).__name__}, not a torch Optimizer"
            )
        self.peer_optimizer = optimizer
        return optimizer

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.leader and self.swarm.initial_peers:
            self.load_state_from_peers()
        self._follow_leader(force=True)

    def load_state_from_peers(self) -> bool:
        """Download the swarm's current state within ``load_state_timeout``; True if it moved this peer forward."""
        before = self.optimizer.local_epoch
        self.optimizer.load_state_from_peers()  # the swarm optimizer says what it loaded, this one or a catch-up
        return self.optimizer.local_epoch != before

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_size = extract_batch_size(batch)  # known before the closure runs inside hivemind's step
        super().on_train_batch_start(batch, batch_idx)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any):
        # hivemind counts samples, not steps, toward target_batch_size: this local step's samples on all ranks
        if self._batch_size is None:
            raise RuntimeError("a local step before its batch: on_train_batch_start reads the batch size")
        kwargs["batch_size"] = self._batch_size * self.world_size
        max_steps = self._module.trainer.max_steps
        if self.leader and self.optimizer.local_epoch + 1 >= max_steps and not self.leave.is_set():
            self.optimizer.prepare_last_step(max_steps)  # peers end holding the same parameters
        result = super().optimizer_step(optimizer, self._hand_gradients(closure), model, **kwargs)
        if self.leader and self.optimizer.local_epoch >= max_steps:
            self._apply_pending_updates()  # before the last checkpoint and the test see these parameters
        self._follow_leader()
        return result

    def stop_averaging_state(self) -> None:
        """Leaving (``core.lightning.leave``, from a helper thread): start no more state-averaging rounds. The
        gradient round in flight goes on, so the others, who wait for this peer's part, lose nothing."""
        if (optimizer := self.peer_optimizer) is not None:
            optimizer.stop_rounds()

    def say_goodbye(self) -> None:
        """Leaving past the deadline (``core.lightning.leave``, from a helper thread): tell the swarm, without waiting
        for the training loop."""
        if (optimizer := self.peer_optimizer) is not None:
            optimizer.say_goodbye()

    def _apply_pending_updates(self) -> None:
        """The leader: wait for the round still in flight and apply its result to the parameters."""
        self.optimizer.finish_pending()

    def _follow_leader(self, force: bool = False) -> None:
        """Every rank, after every local step: take the leader's swarm epoch, and stop when the leader leaves.

        On one device this rank is the leader. ``core.lightning.local_ranks.LocalRanks`` broadcasts the leader's
        epoch, and its parameters when they moved (or ``force``), to the following ranks."""
        self._followed_epoch = self.optimizer.local_epoch
        if self.leave.is_set():
            self._module.trainer.should_stop = True

    # --- where the strategies differ: what hivemind optimizes, how gradients reach it, who follows (local_ranks) --

    def _prepare_swarm_parameters(self) -> None:
        """Every rank, before the optimizers are made."""

    def _swarm_groups(self, groups: list[dict]) -> list[dict]:
        """The parameter groups hivemind optimizes (the leader's): the module's own."""
        return groups

    def _follower_optimizer(self) -> torch.optim.Optimizer:
        """A following rank's optimizer (see ``core.lightning.local_ranks``); one device has no following ranks."""
        raise NotImplementedError("following local ranks need core.lightning.local_ranks.LocalRanks")

    def _hand_gradients(self, closure):
        """The closure hivemind runs: forward and backward leave the gradients where it reads them."""
        return closure

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """``--resume``: restore each optimizer's state where that optimizer keeps it.

        Lightning moves every restored optimizer state to the module's device (``root_device``). A swarm optimizer
        keeps its own: hivemind's offloaded optimizer (``gradient``) steps host copies of the parameters, so its
        statistics stay in host memory whatever the module's device (moved to a GPU, they no longer sit with the host
        parameters they update); DiLoCo's inner optimizer steps the module's parameters, so its statistics go with
        them, and the outer ``shared`` parameters and momentum stay in host memory. torch's ``load_state_dict``
        already puts each statistic beside its own parameter: nothing is moved after it."""
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            optimizer.load_state_dict(state)

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
        if (optimizer := self.peer_optimizer) is not None and optimizer.is_alive():
            optimizer.shutdown()  # teardown runs after fit and again after test
        super().teardown()


class HivemindStrategy(SwarmSteps, SingleDeviceStrategy):
    """One hivemind peer on one device. ``dht`` is a started ``hivemind.DHT`` (see ``core.swarm.dht.start_dht``)."""

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


class _SwarmProgress(pl.Callback):
    """Keeps Lightning's step counter on the swarm step, logs the swarm's numbers, prints a line per swarm step."""

    def __init__(self):
        self.shown_epoch = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        strategy = _swarm_strategy(trainer)
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
            pl_module.log("epoch", float(_swarm_strategy(trainer).swarm_epoch), sync_dist=False)


def _swarm_strategy(trainer: pl.Trainer) -> SwarmSteps:
    """The trainer's strategy, a ``SwarmSteps`` (``_SwarmProgress`` is added by one)."""
    strategy = trainer.strategy
    if not isinstance(strategy, SwarmSteps):
        raise TypeError(f"_SwarmProgress follows a vitpeer swarm strategy, not {type(strategy).__name__}")
    return strategy
