"""Prometheus metrics for volunteers and organisers, and the Grafana dashboard that shows them.

Files, from the host up to the swarm:

- ``host.py``: this host's GPUs through NVML (utilization, memory, power, temperature) and this process's CPU share.
- ``exporter.py``: a training peer's exporter (``vitpeer join --metrics-port``): samples, loss, swarm epoch and size,
  averaging rounds, their duration and estimated bytes, time blocked on the swarm against time computing, state
  downloads; plus ``vitpeer_peer_info`` (with the algorithm).
- ``swarm.py``: swarm series from the peers' signed DHT records (alive peers, swarm samples/s, epoch, loss, one
  series per peer, each peer's rounds, bytes and time) and the coordinator's checkpoint series; served on the
  coordinator's ``/metrics``.
- ``run.py``: ``vitpeer monitor``, the swarm series without a coordinator; ``cli.py``: its command line.
- ``grafana/``: dashboard JSON and provisioning; ``prometheus.yml`` and ``compose.yaml``: a local stack.

Names follow Prometheus conventions: the ``vitpeer_`` prefix, base units (``_seconds``, ``_bytes``, ``_watts``,
``_celsius``), 0-1 ``_ratio`` gauges, ``_total`` counters and ``*_info{...} 1`` metadata.
"""
