"""Averaging with hivemind: the averagers and the swarm optimizer both algorithms build on, and what crosses the wire.

- ``hivemind_averagers``, ``hivemind_optimizer``: the adapter room, every use of hivemind 1.1.12's private names
  (averagers with group sizes, checked and bounded state downloads, our reducer; ``SwarmOptimizer``, the
  ``hivemind.Optimizer`` of the ``gradient`` algorithm);
- ``aggregation``: the aggregation seam, the rule that turns the parts peers send in a round into the part they
  receive (``swarm.aggregation``);
- ``poison_guard``: the one guard that keeps a local batch with NaN or Inf gradients out of the swarm;
- ``remote_state``: the one check a downloaded state passes before anyone takes it;
- ``events``: ``SwarmEvents``, what a swarm optimizer reports (rounds, downloads, skipped batches, time blocked);
- ``quantization``: vitpeer's 8-bit codec for averaged tensors.
"""
