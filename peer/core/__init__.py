"""The swarm-member library: everything a peer, the coordinator and the monitor build on (the bottom layer).

- ``hivemind_adapters``: every use of hivemind 1.1.12's private names (``SwarmOptimizer``, its averagers), pinned.
- ``local_ranks``: one peer made of a host's N local ranks (DDP, FSDP): rank 0 talks to the swarm, the others follow.
- ``events``: ``SwarmEvents``, what the swarm optimizer reports to metrics sinks as it happens.
- ``processes``: nothing outlives its owner: child processes die with us, are stopped, reaped, swept.
"""
