"""``vitpeer coordinator``: seeds a swarm, aggregates its metrics and checkpoints, keeps it alive.

Files, in the order one poll uses them:

- ``run.py``: the command's loop, top to bottom (start, poll, checkpoint, export, HTTP routes).
- ``config.py``: ``CoordinatorConfig``, the coordinator's own settings (state dir, ports, checkpoint schedule).
- ``metrics.py``: reads the peers' signed records from the DHT, aggregates them, appends ``metrics.jsonl``.
- ``state.py``: ``SwarmState``, the run's model and optimizer in a hivemind state averager (download, serve) and
  ``evaluate``.
- ``checkpoints.py``: atomic checkpoint files with sidecars, pruning, and the timm/safetensors export of the best.
- ``api.py``: the read-only HTTP API (``/initial-peers``, ``/status``, ``/config``).

The record schema and validators shared with the peers live in ``peer/report.py``.
"""
