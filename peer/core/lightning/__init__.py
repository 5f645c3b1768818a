"""The Lightning side of a peer: how a Lightning training loop steps a swarm.

- ``strategy``: ``HivemindStrategy``, the Lightning strategy of one peer on one device; ``SwarmSteps``, the swarm
  logic every vitpeer strategy shares: it asks the run's algorithm (``core.algorithms``) for its swarm optimizer and
  steps it once per local batch;
- ``local_ranks``: one peer made of a host's N local ranks (DDP, FSDP): rank 0 talks to the swarm, the others follow;
- ``leave``: leaving the swarm cleanly on SIGTERM or Ctrl-C, and checkpoints written whole (``AtomicCheckpointIO``);
- ``progress``: the live progress bar.

``PeerStrategy``, for type checkers only: the strategies a peer trains with, each a Lightning ``Strategy`` and a
``SwarmSteps``.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the strategy modules import hivemind, which a plain `vitpeer train` never loads
    from vitpeer.peer.core.lightning.local_ranks import HivemindDDPStrategy, HivemindFSDPStrategy
    from vitpeer.peer.core.lightning.strategy import HivemindStrategy

    PeerStrategy = HivemindStrategy | HivemindDDPStrategy | HivemindFSDPStrategy
