"""The ``diloco`` algorithm: peers train alone for a whole swarm step, then average how far they moved.

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
  peer with the next priority asked. A peer offers its state only once it has applied a round: peers that start a
  swarm together do not download each other's untrained state (a whole model each, for nothing).

Where it lives: ``diloco_rounds.DiLoCo``, the outer loop (rounds, hand-offs, applying results);
``diloco_shared.SharedState``, its shared state (syncs, serving joiners, downloads);
``diloco_optimizer.DiLoCoOptimizer``,
what the Lightning strategy steps. Every round and sync reduces with the run's ``swarm.aggregation``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where something is built: the configuration reads this module before torch is imported
    import hivemind
    import torch

    from vitpeer.peer.core.algorithms.base import PeerOptimizer, PeerSetup
    from vitpeer.peer.core.algorithms.observers import SwarmState
    from vitpeer.peer.core.config import RunConfig, SwarmConfig


class DiLoCoAlgorithm:
    """``swarm.algorithm = diloco`` (a ``SwarmAlgorithm``)."""

    name = "diloco"
    default_compression = "fp16"  # pseudo-gradients lose nothing in fp16 (OpenDiLoCo); syncs are exact either way
    default_aggregation = "centered_clip"  # rounds minutes apart: the robust rule's cost is small beside them
    local_strategies = ("single",)  # several local ranks in one diloco peer: not yet

    def refusal(self, swarm: SwarmConfig) -> str | None:
        if swarm.local_updates or swarm.overlap:
            which = "local_updates" if swarm.local_updates else "overlap"
            return (
                f"swarm.{which} is an option of the gradient algorithm; diloco always steps locally and averages in "
                "the background: leave it false, or set swarm.algorithm = 'gradient'"
            )
        return None

    def wrote(self, optimizer_state: Mapping[str, Any]) -> bool:
        return "outer_state" in optimizer_state  # ``DiLoCoOptimizer.state_dict``

    def make_optimizer(
        self, peer: PeerSetup, inner: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None
    ) -> PeerOptimizer:
        """The module's own optimizer steps every local batch; the outer loop averages once per swarm step."""
        from torch.optim.lr_scheduler import LambdaLR

        from vitpeer.peer.core.algorithms.diloco_optimizer import DiLoCoOptimizer
        from vitpeer.peer.core.algorithms.diloco_rounds import DiLoCo
        from vitpeer.peer.core.averaging.aggregation import AGGREGATIONS
        from vitpeer.peer.core.averaging.quantization import compression

        if scheduler is not None and not isinstance(scheduler, LambdaLR):
            name = type(scheduler).__name__
            raise ValueError(f"the diloco algorithm steps a LambdaLR once per swarm step, got {name}")
        swarm = peer.swarm
        params = [param for group in inner.param_groups for param in group["params"]]
        diloco = DiLoCo(
            params,
            dht=peer.dht,
            run_id=swarm.run_id,
            target_batch_size=swarm.target_batch_size,
            outer_lr=swarm.outer_lr,
            outer_momentum=swarm.outer_momentum,
            compression=compression(swarm.wire_compression),
            aggregation=AGGREGATIONS[swarm.rule],
            matchmaking_time=swarm.matchmaking_time,
            averaging_timeout=swarm.averaging_timeout,
            load_state_timeout=swarm.load_state_timeout,
            progress_expiration=swarm.progress_expiration,
            sync_every=swarm.sync_every,
            client_mode=swarm.client_mode,
            max_steps=peer.max_steps,
        )
        return DiLoCoOptimizer(inner, scheduler, diloco, peer.events)

    def observe(self, config: RunConfig, dht: hivemind.DHT) -> SwarmState:
        from vitpeer.peer.core.algorithms.observers import DiLoCoState

        return DiLoCoState(config, dht)


ALGORITHM = DiLoCoAlgorithm()
