"""The ``gradient`` algorithm: every swarm step the peers average their accumulated gradients and all take the same
optimizer step (``hivemind.Optimizer``, as ``core.averaging.hivemind_optimizer.SwarmOptimizer``).

One swarm step, read top to bottom:

1. Each local batch's gradients are added to a local accumulator (``SwarmOptimizer`` keeps a batch with NaN or Inf
   gradients out) and its samples reported to the DHT.
2. When the peers' reports add up to ``target_batch_size``, every peer sends its accumulated gradients to a hivemind
   all-reduce (what a round sends) and receives the reduced gradients (``swarm.aggregation``, ``none`` compression by
   default); hivemind's offloaded optimizer steps host copies of the parameters with them and writes them back to the
   module (how the result is applied). A failed round steps with this peer's own gradients.
3. Every ``average_state_every`` swarm steps (and at the last) the peers also average their parameters and optimizer
   statistics in a state round, which brings back together peers that stepped alone.

A newcomer downloads the parameters, the optimizer statistics and the swarm step (hivemind's
``TrainingStateAverager``), checked by ``core.averaging.remote_state.training_state_check``. Several local ranks (DDP,
FSDP) may form one peer (``core.lightning.local_ranks``). ``local_updates`` and ``overlap`` are this algorithm's own
options.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where something is built: the configuration reads this module before torch is imported
    import hivemind
    import torch

    from vitpeer.peer.core.algorithms.base import PeerOptimizer, PeerSetup
    from vitpeer.peer.core.algorithms.observers import SwarmState
    from vitpeer.peer.core.config import RunConfig, SwarmConfig

log = logging.getLogger(__name__)


class GradientAlgorithm:
    """``swarm.algorithm = gradient`` (a ``SwarmAlgorithm``)."""

    name = "gradient"
    default_compression = "none"
    default_aggregation = "mean"  # a round every target batch: robust rules not yet measured at that rate
    local_strategies = ("single", "ddp", "fsdp")

    def refusal(self, swarm: SwarmConfig) -> str | None:
        if swarm.local_updates and swarm.overlap:
            return "swarm.local_updates averages no gradients, so swarm.overlap must be false with it"
        return None

    def wrote(self, optimizer_state: Mapping[str, Any]) -> bool:
        return "local_epoch" in (optimizer_state.get("state") or {})  # hivemind's ``Optimizer.state_dict``

    def make_optimizer(
        self, peer: PeerSetup, inner: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None
    ) -> PeerOptimizer:
        from vitpeer.peer.core.averaging.aggregation import AGGREGATIONS
        from vitpeer.peer.core.averaging.hivemind_optimizer import SwarmOptimizer, factory_form
        from vitpeer.peer.core.averaging.quantization import compression

        params, optimizer, scheduler_factory = factory_form(inner, scheduler)
        swarm = peer.swarm
        aggregation = AGGREGATIONS[swarm.rule]
        return SwarmOptimizer(
            events=peer.events,
            dht=peer.dht,
            run_id=swarm.run_id,
            # hivemind 1.1.12 keeps client_mode None when it is not passed (``client_mode if client_mode is None else
            # dht.client_mode``) while its averagers take the DHT's: a client-mode peer then offered its state and
            # exited at its first download ("averager in client mode cannot share its state")
            client_mode=peer.dht.client_mode,
            max_steps=peer.max_steps,  # no downloaded state may be past the run's last step
            aggregation=aggregation,
            target_batch_size=swarm.target_batch_size,
            params=peer.swarm_groups(params),
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
            grad_compression=compression(swarm.wire_compression),
            state_averaging_compression=compression(swarm.wire_compression),
            # matchmaking requests must time out before the matchmaking window closes (hivemind warns otherwise)
            averager_opts={"request_timeout": min(3.0, swarm.matchmaking_time / 2)},
            tracker_opts={"metadata_expiration": swarm.progress_expiration},  # re-reported every half of it
            verbose=log.isEnabledFor(logging.DEBUG),
        )

    def observe(self, config: RunConfig, dht: hivemind.DHT) -> SwarmState:
        from vitpeer.peer.core.algorithms.observers import GradientState

        return GradientState(config, dht)


ALGORITHM = GradientAlgorithm()
