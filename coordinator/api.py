"""The coordinator's read-only HTTP API (standard library server, one thread per request).

``GET /initial-peers`` (text: one multiaddr per line), ``GET /status`` (JSON), ``GET /config`` (the run's YAML,
without the coordinator's own addresses and paths), ``GET /metrics`` (Prometheus text format, see ``monitor.swarm``).
Volunteers use it through ``vitpeer join --coordinator URL``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

Route = Callable[[], tuple[str, str]]
"""Returns (content type, body) for one GET path."""


class ApiServer:
    """Serves ``routes`` on ``host:port`` in a background thread until ``shutdown``."""

    def __init__(self, host: str, port: int, routes: dict[str, Route]):
        self.routes = routes
        handler = type("Handler", (_Handler,), {"routes": routes})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="coordinator-api", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, Route] = {}

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        route = self.routes.get(self.path.split("?", 1)[0].rstrip("/") or "/")
        if route is None:
            self._send(404, "text/plain", f"no such path; try {', '.join(sorted(self.routes))}\n")
            return
        try:
            content_type, body = route()
        except Exception as err:  # a failing route must not take the server down
            log.exception("GET %s failed", self.path)
            self._send(500, "text/plain", f"{type(err).__name__}: {err}\n")
            return
        self._send(200, content_type, body)

    def _send(self, code: int, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        if "charset" not in content_type:
            content_type += "; charset=utf-8"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature fixed by the standard library)
        log.debug("http %s " + format, self.client_address[0], *args)
