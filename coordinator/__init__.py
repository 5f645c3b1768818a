"""``vitpeer coordinator``: seeds a swarm, aggregates its metrics and checkpoints, keeps it alive.

Files, in the order one poll uses them:

- ``run.py``: the command's loop, top to bottom (start, poll, checkpoint, export, HTTP routes).
- ``config.py``: ``CoordinatorConfig``, the coordinator's own settings (state dir, ports, checkpoint schedule).
- ``cli.py``: the command line (flags from ``CoordinatorConfig``'s fields).
- ``state.py``: ``SwarmState``, the run's state in the protocol of its algorithm (``GradientState``: model and
  optimizer; ``DiLoCoState``: shared parameters and outer momentum), downloaded and served; and ``evaluate``.
- ``checkpoints.py``: atomic checkpoint files with sidecars, pruning, and the timm/safetensors export of the best.
- ``api.py``: the read-only HTTP API (``/initial-peers``, ``/status``, ``/config``).

The records, their schemas and validators, and their aggregation live in ``peer/core/records.py``; the HTTP server
in ``peer/core/http.py``.
"""
