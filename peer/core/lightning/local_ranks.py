"""One hivemind peer made of this host's N local ranks: the leader talks to the swarm, the others follow it.

``Trainer(devices=N)`` with ``HivemindDDPStrategy`` (DDP inside the host) or ``HivemindFSDPStrategy`` (FSDP2: each
rank holds 1/N of the parameters) trains N devices as *one* peer of the swarm. Local rank 0, the *leader*, holds the
``SwarmOptimizer`` and talks to the swarm (``core.lightning.strategy.SwarmSteps``, as on one device); ranks 1..N-1, the
*followers*, never touch the DHT. Why every rank ends each step with the leader's parameters (``LocalRanks``):

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

FSDP changes what the leader's hivemind optimizer holds (a full host-memory replica of the sharded parameters) and
how the parameters follow (each rank takes its shard of the replica): see ``HivemindFSDPStrategy``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hivemind
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.tensor import distribute_tensor

from vitpeer.peer.core.averaging.events import SwarmEvents
from vitpeer.peer.core.config import SwarmConfig
from vitpeer.peer.core.lightning.strategy import SwarmSteps


class _FollowerOptimizer(torch.optim.Optimizer):
    """A following rank's optimizer: it runs the closure (forward, backward, and DDP's all-reduce in backward) and
    changes nothing. The leader's hivemind step moves the parameters; the broadcast after it reaches this rank."""

    def __init__(self, param_groups: list[dict]):
        super().__init__([{"params": group["params"]} for group in param_groups], {})

    def step(self, closure: Callable[[], Any] | None = None, **_: Any) -> Any:
        with torch.enable_grad():
            return closure() if closure is not None else None

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # a checkpoint's optimizer state belongs to the leader's swarm optimizer


class LocalRanks(SwarmSteps):
    """``SwarmSteps`` over N local ranks: followers get a ``_FollowerOptimizer``, and after every local step the
    leader's epoch, ``parameters_version`` and ``leave`` reach every rank by broadcast (see the module docstring)."""

    def _init_swarm(self, swarm: SwarmConfig, dht: hivemind.DHT | None, events: SwarmEvents | None) -> None:
        super()._init_swarm(swarm, dht, events)
        self._followed_version = -1

    def _follower_optimizer(self) -> torch.optim.Optimizer:
        return _FollowerOptimizer(self._follower_groups())

    def _follower_groups(self) -> list[dict]:
        return self.optimizers[0].param_groups

    def _follow_leader(self, force: bool = False) -> None:
        """Every rank: take the leader's swarm epoch and, when its parameters moved (or ``force``), the parameters."""
        if self.world_size == 1:
            super()._follow_leader(force)
            return
        mine = [self.optimizer.local_epoch, self.optimizer.parameters_version] if self.leader else [0, 0]
        state = torch.tensor([*mine, int(self.leave.is_set())], device=self.root_device)
        torch.distributed.broadcast(state, src=0)
        epoch, version, leaving = (int(value) for value in state.tolist())
        if force or version != self._followed_version:
            with torch.no_grad():
                self._sync_parameters()
        self._followed_epoch, self._followed_version = epoch, version
        if leaving:
            self._module.trainer.should_stop = True

    def _sync_parameters(self) -> None:
        """Every rank: the leader's parameters and buffers, by broadcast."""
        module = self._module
        for tensor in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


class HivemindDDPStrategy(LocalRanks, DDPStrategy):
    """One hivemind peer made of this host's N devices (``Trainer(devices=N)``): DDP inside the host, local rank 0
    talks to the swarm (see ``LocalRanks``). ``dht`` is the leader's started DHT; None on the other ranks."""

    strategy_name = "hivemind_ddp"

    def __init__(self, swarm: SwarmConfig, dht: hivemind.DHT | None, events: SwarmEvents | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_swarm(swarm, dht, events)


class HivemindFSDPStrategy(LocalRanks, ModelParallelStrategy):
    """One hivemind peer made of this host's N devices with FSDP2: each rank holds 1/N of every parameter and
    gradient (``ImageClassifier.configure_model`` shards the network), while the swarm averages the whole model.

    Why it is correct, in addition to ``LocalRanks``:

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
        # a collective: every rank takes part
        fulls = [shard.full_tensor() for shard in self._shards]  # pyright: ignore[reportAttributeAccessIssue]  # FSDP2's parameters are DTensors; torch types them as Parameter
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
                # every rank takes part
                full = shard.grad.full_tensor() if shard.grad is not None else None  # pyright: ignore[reportAttributeAccessIssue]  # a DTensor's gradient is a DTensor; torch types it as Tensor
                if self.leader:
                    self._replicas[index].grad = None if full is None else full.to("cpu")
                shard.grad = None
            clip = self._module.trainer.gradient_clip_val
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
            scattered = distribute_tensor(full, shard.device_mesh, shard.placements, src_data_rank=0)  # pyright: ignore[reportAttributeAccessIssue]  # a DTensor, typed as Parameter
            shard.to_local().copy_(scattered.to_local())  # pyright: ignore[reportAttributeAccessIssue]  # as above
        for buffer in self._module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict() if self.leader else {}  # the leader's swarm optimizer, over its replica
