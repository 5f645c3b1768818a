"""How peers train together: one interface, one implementation per algorithm, and what an observer holds of a run.

- ``base``: ``SwarmAlgorithm`` (what differs between algorithms) and ``PeerOptimizer`` (what the Lightning strategy
  steps); the registry naming them is ``core.config.swarm.ALGORITHMS``;
- ``gradient``: the ``gradient`` algorithm (gradients averaged every swarm step; ``SwarmOptimizer`` does the work);
- ``diloco``: the ``diloco`` algorithm, explained top to bottom, built from ``diloco_rounds`` (the outer loop),
  ``diloco_shared`` (the shared state: exact syncs, serving joiners, downloads) and ``diloco_optimizer`` (what the
  strategy steps);
- ``observers``: the run's state as the coordinator downloads, checkpoints and serves it, one class per algorithm.
"""
