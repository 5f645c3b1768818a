"""The coordinator's read-only HTTP API and its live page, served by ``vitpeer.peer.core.runtime.http``'s hardened
server like every ``/metrics``.

``GET /initial-peers`` (text: one multiaddr per line), ``GET /status`` (JSON), ``GET /config`` (the run's YAML,
without the coordinator's own addresses and paths), ``GET /metrics`` (Prometheus text, see ``monitor.swarm``), and
the page (``page_routes``): ``/`` with its script and style from ``web/`` (package data: no build step, no CDN),
``/history.json`` (the last ``HISTORY_POINTS`` lines of ``metrics.jsonl`` and the evaluations), and the best model's
two files under fixed paths (``BEST_FILES``): nothing else on disk is reachable, whatever the request says.
The routes themselves are ``Coordinator.routes`` in ``run.py``. Volunteers use it through
``vitpeer join --coordinator URL``, so a coordinator meant for volunteers binds ``--http-host 0.0.0.0``; the default,
127.0.0.1, serves this host only. GET and HEAD only; request size, time and connections are bounded.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from vitpeer.peer.core.runtime.http import HttpServer, Route

__all__ = ["ApiServer", "Route", "page_routes", "read_history"]

PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/page.js": ("page.js", "text/javascript"),
    "/page.css": ("page.css", "text/css"),
}
"""The page's own assets: read once from the package when the routes are built (a missing one fails the start)."""
BEST_FILES = {
    "/best/model.safetensors": ("model.safetensors", "application/octet-stream"),
    "/best/config.json": ("config.json", "application/json"),
}
"""The best checkpoint's timm export (``checkpoints.export_for_timm``), downloadable from the page; fixed names in
``<state-dir>/best/`` are the only files of the state directory served."""
HISTORY_POINTS = 500
"""Swarm steps ``/history.json`` returns at most (the newest): enough for a chart, small enough to poll."""
HISTORY_BYTES = 4 << 20
"""Bytes read from the end of ``metrics.jsonl`` at most per request (a line per step; peers make lines longer)."""
HISTORY_FIELDS = ("swarm_epoch", "loss", "samples_per_second", "alive_peers", "time")
EVALUATION_FIELDS = ("swarm_epoch", "val_accuracy", "val_loss", "time")


class ApiServer(HttpServer):
    """``routes`` on ``host:port`` (``--http-host``, ``--http-port``) in a background thread until ``shutdown``."""

    thread_name = "coordinator-api"


def _finite(value: Any) -> Any:
    """Strict JSON has no NaN or Infinity: a browser's ``JSON.parse`` refuses them."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def tail_lines(path: Path, max_lines: int, max_bytes: int = HISTORY_BYTES) -> list[bytes]:
    """The last ``max_lines`` complete lines of ``path`` within its last ``max_bytes`` bytes; [] when it is absent."""
    try:
        with path.open("rb") as source:
            size = source.seek(0, 2)
            start = max(0, size - max_bytes)
            source.seek(start)
            data = source.read(size - start)
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # cut in the middle
    return [line for line in lines if line.strip()][-max_lines:]


def _records(path: Path, fields: tuple[str, ...], max_lines: int) -> list[dict[str, Any]]:
    found = []
    for line in tail_lines(path, max_lines):
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        if isinstance(record, dict) and isinstance(record.get("swarm_epoch"), int):
            found.append({key: _finite(record.get(key)) for key in fields})
    return found


def read_history(state_dir: Path, sidecars: Callable[[], list[dict[str, Any]]] = list) -> dict[str, Any]:
    """``/history.json``: ``points``, the newest ``HISTORY_POINTS`` lines of ``metrics.jsonl`` (per-peer steps left
    out), and ``evaluations``, the checkpoints' validation scores by swarm step (``evaluations.jsonl``, with the
    sidecars of the checkpoints on disk for steps it lacks)."""
    points = _records(state_dir / "metrics.jsonl", HISTORY_FIELDS, HISTORY_POINTS)
    evaluations = {e["swarm_epoch"]: e for e in _records(state_dir / "evaluations.jsonl", EVALUATION_FIELDS, 1000)}
    for sidecar in sidecars():
        evaluations.setdefault(sidecar["swarm_epoch"], {key: _finite(sidecar.get(key)) for key in EVALUATION_FIELDS})
    return {"points": points, "evaluations": [evaluations[step] for step in sorted(evaluations)]}


class _CachedFile:
    """One fixed file's bytes, read again only when its size or modification time changed: every concurrent download
    shares one copy in memory. FileNotFoundError (the server's 404, one line) until the file exists."""

    def __init__(self, path: Path):
        self.path, self.key, self.data = path, None, b""
        self.lock = threading.Lock()

    def read(self) -> bytes:
        with self.lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                raise FileNotFoundError(f"no {self.path.name} yet: no checkpoint has been evaluated") from None
            if (stat.st_size, stat.st_mtime_ns) != self.key:
                self.data, self.key = self.path.read_bytes(), (stat.st_size, stat.st_mtime_ns)
            return self.data


def _asset(name: str, content_type: str) -> Route:
    # one part per joinpath: a Traversable takes no more before Python 3.11 (a zip or namespace package's)
    body = files("vitpeer.coordinator").joinpath("web").joinpath(name).read_bytes()
    return lambda: (content_type, body)


def _download(cached: _CachedFile, content_type: str) -> Route:
    return lambda: (content_type, cached.read())


def page_routes(state_dir: Path, sidecars: Callable[[], list[dict[str, Any]]] = list) -> dict[str, Route]:
    """The live page's routes: its assets, ``/history.json`` and the best model's files (``BEST_FILES``)."""
    routes = {path: _asset(name, kind) for path, (name, kind) in PAGE_FILES.items()}
    routes["/history.json"] = lambda: ("application/json", json.dumps(read_history(state_dir, sidecars)))
    for path, (name, kind) in BEST_FILES.items():
        routes[path] = _download(_CachedFile(state_dir / "best" / name), kind)
    return routes
