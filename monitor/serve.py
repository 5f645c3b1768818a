"""Serving a registry on ``/metrics`` in a background thread (prometheus_client's own HTTP server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


class MetricsServer:
    """``registry`` at ``http://addr:port/metrics`` until ``shutdown``; port 0 picks a free port (see ``url``)."""

    def __init__(self, registry: CollectorRegistry, addr: str, port: int):
        try:
            self.server, self.thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as err:
            raise RuntimeError(
                f"cannot serve metrics on {addr}:{port} ({err.strerror}); pick another --metrics-port"
            ) from err
        self.url = f"http://{addr}:{self.server.server_port}/metrics"

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
