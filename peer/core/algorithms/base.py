"""The interface of a way to train together (``SwarmAlgorithm``) and of what it hands the Lightning strategy to step
(``PeerOptimizer``).

An algorithm owns everything that differs between ways of training together: which hivemind parts it builds (an
optimizer, averagers), what a round sends and how its result is applied (inside its ``PeerOptimizer``), the state a
newcomer downloads and the check it must pass, what the coordinator reads and checkpoints (its ``SwarmState``), which
local strategies it supports and which options of the swarm section it refuses. How the parts that peers send in a
round are combined is not the algorithm's: every averager of every algorithm reduces with the run's aggregation rule
(``core.averaging.aggregation``).

The registry that maps ``swarm.algorithm`` to an implementation is ``core.config.swarm.ALGORITHMS``; each registered
module's ``ALGORITHM`` satisfies ``SwarmAlgorithm``. The configuration asks an algorithm for its defaults and
refusals before torch is imported (so a bad value is refused at once), so an algorithm's module imports torch and
hivemind only inside the methods that build something.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import hivemind
    import torch
    from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker

    from vitpeer.peer.core.algorithms.observers import SwarmState
    from vitpeer.peer.core.averaging.events import SwarmEvents
    from vitpeer.peer.core.config import RunConfig, SwarmConfig


def same_groups(groups: list[dict]) -> list[dict]:
    """The parameter groups a swarm optimizer steps, as the module's optimizer holds them (one device)."""
    return groups


@dataclass
class PeerSetup:
    """What an algorithm builds a peer's swarm optimizer from (``SwarmAlgorithm.make_optimizer``)."""

    swarm: SwarmConfig
    dht: hivemind.DHT
    events: SwarmEvents
    """Where the optimizer reports rounds, downloads and skipped batches."""
    max_steps: int | None
    """The run's last swarm step (``trainer.max_steps``): no downloaded state may be past it."""
    swarm_groups: Callable[[list[dict]], list[dict]] = field(default=same_groups)
    """The parameter groups the swarm steps, given the module's (``core.lightning.local_ranks`` hands the leader's
    own copies when several local ranks form one peer)."""


class PeerOptimizer(Protocol):
    """What the Lightning strategy (``core.lightning.strategy``) steps once per local batch and asks of the swarm,
    whichever the algorithm. Lightning sees it as the module's optimizer: an implementation is also a
    ``torch.optim.Optimizer`` (the strategy refuses one that is not)."""

    @property
    def skipped_batches(self) -> int:
        """Local batches kept out of the swarm because their gradients (or the step they made) held NaN or Inf."""
        ...

    dropped_behind: int
    """Local batches dropped unsent because this peer was behind the swarm and loaded its state instead."""
    parameters_version: int
    """Bumped whenever the swarm wrote this peer's parameters: following local ranks sync when it moves."""

    @property
    def local_epoch(self) -> int:
        """The swarm step this peer is at."""
        ...

    @property
    def tracker(self) -> ProgressTracker:
        """hivemind's progress tracker of the run: the swarm's samples, peers and step."""
        ...

    @property
    def local_progress(self) -> LocalTrainingProgress: ...

    @property
    def target_batch_size(self) -> int:
        """Samples the swarm gathers per swarm step, over all peers."""
        ...

    @property
    def opt(self) -> torch.optim.Optimizer:
        """The optimizer that steps this peer's parameters (its param groups hold the learning rate)."""
        ...

    @property
    def param_groups(self) -> Iterable[dict[str, Any]]: ...

    def step(self, closure: Callable[[], Any] | None = None, batch_size: int | None = None) -> Any:
        """One local batch: run ``closure`` (forward and backward), then whatever the algorithm does with it."""
        ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def load_state_from_peers(self) -> None:
        """Download the swarm's current state within ``load_state_timeout``, checked before it is taken."""
        ...

    def prepare_last_step(self, max_steps: int) -> None:
        """The next swarm step is the run's last: make it end with every peer holding the same parameters."""
        ...

    def finish_pending(self) -> None:
        """Wait for the round still in flight and apply its result to the parameters."""
        ...

    def stop_rounds(self) -> None:
        """Leaving: start no more rounds of this peer's own."""
        ...

    def say_goodbye(self) -> None:
        """Tell the swarm this peer is gone, without waiting for the training loop."""
        ...

    def is_alive(self) -> bool: ...

    def shutdown(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class SwarmAlgorithm(Protocol):
    """One way of training together. Registered in ``core.config.swarm.ALGORITHMS`` under ``name``."""

    name: str
    """The value of ``swarm.algorithm`` that selects it; written into every checkpoint and record of its runs."""
    default_compression: str
    """What its averaged tensors travel as when ``swarm.compression`` is unset (``none``, ``fp16`` or ``8bit``)."""
    default_aggregation: str
    """How its rounds combine the peers' parts when ``swarm.aggregation`` is unset (``core.averaging.aggregation``)."""
    local_strategies: tuple[str, ...]
    """The ``parallel.strategy`` values a peer of this algorithm may use (several local ranks as one peer or not)."""

    def refusal(self, swarm: SwarmConfig) -> str | None:
        """Why ``swarm`` cannot run with this algorithm (an option it does not have), or None. Called while the
        configuration is validated: no torch here."""
        ...

    def wrote(self, optimizer_state: Mapping[str, Any]) -> bool:
        """Whether a Lightning checkpoint's first optimizer state is this algorithm's (``--resume`` resumes only
        under the algorithm that wrote it)."""
        ...

    def make_optimizer(
        self, peer: PeerSetup, inner: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None
    ) -> PeerOptimizer:
        """This peer's swarm optimizer, from the module's own optimizer and schedule (a ``LambdaLR``: stepped once
        per swarm step, so peers that joined at different times agree on the learning rate)."""
        ...

    def observe(self, config: RunConfig, dht: hivemind.DHT) -> SwarmState:
        """The run's state as an observer (the coordinator) downloads, checkpoints and serves it."""
        ...
