"""``vitpeer coordinator``: seeds a swarm, aggregates its metrics and checkpoints, keeps it alive.

Files, in the order one poll uses them:

- ``run.py``: the command's loop, top to bottom (start, poll, checkpoint, export, HTTP routes).
- ``config.py``: ``CoordinatorConfig``, the coordinator's own settings (state dir, ports, checkpoint schedule).
- ``cli.py``: the command line (flags from ``CoordinatorConfig``'s fields).
- ``state.py``: opening the run's state in the protocol of its algorithm (``open_swarm_state``; the state classes,
  ``GradientState`` and ``DiLoCoState``, are ``peer/core/algorithms/observers.py``) and ``evaluate``.
- ``checkpoints.py``: atomic checkpoint files with sidecars, pruning, and the timm/safetensors export of the best.
- ``api.py``: the read-only HTTP API (``/initial-peers``, ``/status``, ``/config``).

The records, their schemas and validators, and their aggregation live in ``peer/core/swarm/records.py``; the HTTP
server in ``peer/core/runtime/http.py``.
"""
