"""The coordinator's read-only HTTP API, served by ``vitpeer.peer.core.http``'s hardened server like every ``/metrics``.

``GET /initial-peers`` (text: one multiaddr per line), ``GET /status`` (JSON), ``GET /config`` (the run's YAML,
without the coordinator's own addresses and paths), ``GET /metrics`` (Prometheus text, see ``monitor.swarm``).
The routes themselves are ``Coordinator.routes`` in ``run.py``. Volunteers use it through
``vitpeer join --coordinator URL``, so a coordinator meant for volunteers binds ``--http-host 0.0.0.0``; the default,
127.0.0.1, serves this host only. GET and HEAD only; request size, time and connections are bounded.
"""

from __future__ import annotations

from vitpeer.peer.core.http import HttpServer, Route

__all__ = ["ApiServer", "Route"]


class ApiServer(HttpServer):
    """``routes`` on ``host:port`` (``--http-host``, ``--http-port``) in a background thread until ``shutdown``."""

    thread_name = "coordinator-api"
