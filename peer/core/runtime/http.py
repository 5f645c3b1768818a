"""One small read-only HTTP server for the coordinator's API and every ``/metrics`` endpoint.

Why not prometheus_client's ``start_http_server`` or a bare ``ThreadingHTTPServer``: both wait forever for a client
that sends nothing, accept whatever method and body a client sends, and start one thread per connection without
limit, so anyone who reaches the port can tie up a training peer or the coordinator. This one:

- answers GET and HEAD of its routes only (405 with ``Allow`` otherwise) and refuses a request body unread (413);
- refuses request targets over 2048 bytes (414); header lines over 64 KiB, or more than 100 of them, get
  http.server's 431;
- gives a connection ``timeout`` seconds to send its whole request (a client trickling one byte at a time is cut
  off too), and as long again to take the response;
- serves at most ``max_connections`` at once, and at most ``max_per_client`` from one client address, and answers
  503 at once beyond either, without starting a thread: a stranger holding idle or trickling connections fills only
  their own share, and everyone else is still served;
- writes a response in chunks, each with ``timeout`` to leave, so a large file reaches a slow client however long it
  takes in all (one ``sendall`` with a timeout is cut off when the timeout ends, mid-file);
- given ``names`` (the coordinator's API, which serves a page), answers only requests whose ``Host`` is an IP
  address, ``localhost``, this machine's name, or one of ``names`` (421 otherwise): a web page cannot rebind a name
  of its own to this server's address and read it from a volunteer's browser. ``/metrics`` alone takes any Host:
  Prometheus scrapes by whatever name its service discovery gives;
- sends ``X-Content-Type-Options: nosniff``, a ``Content-Security-Policy`` that allows this origin's own files only,
  and ``Referrer-Policy: no-referrer`` with every response;
- answers 404 with one line when a route's file does not exist yet (FileNotFoundError), 500 with one line when a
  route raises anything else, and keeps serving; it logs at debug level only.

One request per connection (HTTP/1.0, ``Connection: close``), so no idle keep-alive connection holds a slot. It binds
where it is told; its callers bind 127.0.0.1 unless asked (``--metrics-addr``, ``--http-host``).
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
import socketserver
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

Route = Callable[[], tuple[str, str | bytes]]
"""Returns (content type, body) for one GET path."""

ALLOWED_METHODS = ("GET", "HEAD")
MAX_TARGET_BYTES = 2048
DEFAULT_TIMEOUT = 10.0
"""Seconds a client has to send its request (and again to take the response): scrapers and ``vitpeer join`` need
milliseconds on a LAN, a second or two across the internet."""
DEFAULT_MAX_CONNECTIONS = 128
"""Connections served at once, one thread each: Prometheus scrapes with one, a joining peer asks two routes."""
DEFAULT_MAX_PER_CLIENT = 8
"""Connections served at once from one client address (a browser opens up to 6 to a host)."""
CHUNK_BYTES = 1 << 16
"""Bytes written per send: each send has ``timeout`` seconds, so a response as a whole has no time limit."""
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
}
SHUTDOWN_POLL = 0.1
"""Seconds ``shutdown`` may wait for the accepting loop to notice (the standard library's 0.5 slows down tests)."""


class HttpServer:
    """Serves ``routes`` (path -> ``Route``) on ``host:port`` in a background thread until ``shutdown``.

    Port 0 picks a free port (see ``port``). ``timeout`` and ``max_connections`` are the limits described in this
    module's docstring; tests lower them. Raises ``OSError`` when the address cannot be bound.
    """

    thread_name = "http"

    def __init__(
        self,
        host: str,
        port: int,
        routes: dict[str, Route],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_client: int = DEFAULT_MAX_PER_CLIENT,
        names: tuple[str, ...] | None = None,
    ):
        self.routes = routes
        self.server = _Server((host, port), routes, timeout, max_connections, max_per_client)
        if names is not None:  # the Host check: a server a browser may be pointed at
            known = {"localhost", socket.gethostname(), socket.getfqdn(), *names}
            self.server.names = {name.lower().rstrip(".") for name in known}
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(SHUTDOWN_POLL,), name=self.thread_name, daemon=True
        )
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_port

    def shutdown(self) -> None:
        """Stop accepting, close the port, and cut the connections still open so their threads end now."""
        self.server.shutdown()
        self.server.server_close()
        self.server.drop_connections()


class MetricsServer(HttpServer):
    """``registry`` at ``http://addr:port/metrics`` until ``shutdown``; port 0 picks a free port (see ``url``)."""

    thread_name = "metrics"

    def __init__(
        self,
        registry: CollectorRegistry,
        addr: str,
        port: int,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ):
        routes: dict[str, Route] = {"/metrics": lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))}
        try:
            super().__init__(addr, port, routes, timeout=timeout, max_connections=max_connections)
        except OSError as err:
            raise RuntimeError(
                f"cannot serve metrics on {addr}:{port} ({err.strerror}); pick another --metrics-port"
            ) from err
        host = f"[{addr}]" if ":" in addr else addr
        self.url = f"http://{host}:{self.port}/metrics"


def _address_family(host: str) -> socket.AddressFamily:
    """IPv6 for hosts such as ``::``, IPv4 otherwise ("" means every IPv4 interface), as prometheus_client chose."""
    if not host:
        return socket.AF_INET
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]


def _busy_response(why: str) -> bytes:
    body = f"503 busy: {why}; try again\n".encode()
    head = (
        "HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Server(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` that keeps its open connections, to refuse those beyond the limit and to cut them."""

    block_on_close = False  # shutdown must not wait for slow clients: drop_connections ends them instead
    request_queue_size = 64  # a burst waits in the kernel's queue and gets its 503, rather than a dropped SYN

    def __init__(
        self, address: tuple[str, int], routes: dict[str, Route], timeout: float, max_connections: int, per_client: int
    ):
        self.address_family = _address_family(address[0])
        self.routes, self.request_timeout, self.max_connections = routes, timeout, max_connections
        self.max_per_client = per_client
        self.names: set[str] | None = None  # the Host names it answers besides IP addresses; None: any
        self.open: dict[socket.socket, str] = {}  # open connection -> its client's address
        self.lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without http.server's reverse DNS lookup of the host, which hangs where no DNS server answers."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    # a TCP server's request is a socket; typeshed's BaseServer also allows a UDP server's (bytes, socket) pair
    def process_request(self, request: socket.socket, client_address: tuple) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        client = client_address[0]
        with self.lock:
            if len(self.open) >= self.max_connections:
                why = f"{self.max_connections} connections open"
            elif sum(other == client for other in self.open.values()) >= self.max_per_client:
                why = f"{self.max_per_client} connections open from {client}"
            else:
                why = ""
                self.open[request] = client
        if not why:
            super().process_request(request, client_address)  # one daemon thread
        else:
            self.refuse_busy(request, client_address, why)

    def refuse_busy(self, request: socket.socket, client_address: tuple, why: str) -> None:
        """503 from the accepting thread without reading the request: it costs no thread and cannot block."""
        log.debug("http %s refused: %s", client_address[0], why)
        try:
            request.settimeout(1.0)
            request.sendall(_busy_response(why))
        except OSError:
            pass
        self.shutdown_request(request)

    def shutdown_request(self, request: socket.socket) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]  # a socket, as above
        """Free the connection's slot before closing it, so a client that saw the close finds the slot free."""
        with self.lock:
            self.open.pop(request, None)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self.lock:
            connections = list(self.open)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed meanwhile
                pass

    def handle_error(self, request: socket.socket, client_address: tuple) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]  # as above
        """A client that went away mid-answer is its own business: no traceback on stderr."""
        log.debug("http connection from %s failed", client_address[0], exc_info=True)


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes, but no read ends after ``deadline``.

    The standard reader's timeout restarts with every byte, so a client sending one byte every few seconds could
    hold its thread for as long as it likes; here the whole request must arrive in time.
    """

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    """One request: refuse what a read-only server never needs, then answer from ``server.routes``."""

    server: _Server  # pyright: ignore[reportIncompatibleVariableOverride]  # typeshed: any BaseServer; ours: _Server's
    error_message_format = "%(code)d %(message)s\n"  # http.server's own refusals (400, 414, 431) in one line too
    error_content_type = "text/plain; charset=utf-8"

    def version_string(self) -> str:
        return "vitpeer"  # not the Python version

    def setup(self) -> None:
        # typeshed calls timeout a ClassVar; StreamRequestHandler.setup reads self.timeout, so this server's wins
        self.timeout = self.server.request_timeout  # pyright: ignore[reportAttributeAccessIssue]
        super().setup()
        self.rfile.close()  # the socket stays open; its reader is replaced by one with a deadline
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + self.timeout))

    def parse_request(self) -> bool:
        """http.server's parsing and header limits, then ours; False when a refusal was sent."""
        if not super().parse_request():
            return False
        self.connection.settimeout(self.timeout)  # the request is in; the response gets a timeout of its own
        if self.command not in ALLOWED_METHODS:
            allowed = ", ".join(ALLOWED_METHODS)
            self._send(405, "text/plain", f"405 read-only: {allowed} only\n", {"Allow": allowed})
        elif len(self.path) > MAX_TARGET_BYTES:  # latin-1 text: one character per byte received
            self.send_error(414, f"request target over {MAX_TARGET_BYTES} bytes")
        elif self._has_body():
            self.send_error(413, "no request body accepted")
        elif not self._known_host():
            self._send(421, "text/plain", "421 this server does not answer for that Host name\n")
        else:
            return True
        return False

    def _known_host(self) -> bool:
        """``Host`` (its name without the port) is an IP address, or a name this server answers for; no Host is
        fine too (HTTP/1.0 clients, which no browser is)."""
        host = self.headers.get("Host")
        if host is None or self.server.names is None:
            return True
        name = host.strip().lower()
        name = name[1 : name.find("]")] if name.startswith("[") else name.rsplit(":", 1)[0]
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return name.rstrip(".") in self.server.names
        return True

    def _has_body(self) -> bool:
        """Any Transfer-Encoding, or a Content-Length other than 0 (an unreadable one included)."""
        lengths = self.headers.get_all("Content-Length", [])
        declared = any(not value.strip().isdigit() or int(value) > 0 for value in lengths)
        return declared or "Transfer-Encoding" in self.headers

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        route = self.server.routes.get(path)
        if route is None:
            self._send(404, "text/plain", f"no such path; try {', '.join(sorted(self.server.routes))}\n")
            return
        try:
            content_type, body = route()
        except FileNotFoundError as err:  # e.g. the best model before any checkpoint was evaluated
            self._send(404, "text/plain", f"{err}\n")
            return
        except Exception as err:  # a failing route must not take the server down
            log.debug("%s %s failed", self.command, path, exc_info=True)
            self._send(500, "text/plain", " ".join(f"{type(err).__name__}: {err}".split()) + "\n")
            return
        self._send(200, content_type, body)

    do_HEAD = do_GET  # _send leaves the body out

    def _send(self, code: int, content_type: str, body: str | bytes, headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        if "charset" not in content_type:
            content_type += "; charset=utf-8"
        self.send_response(code)
        fields = {"Content-Type": content_type, "Content-Length": str(len(data)), "Connection": "close"}
        for name, value in {**fields, **SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            view = memoryview(data)
            for start in range(0, len(view), CHUNK_BYTES):  # a timeout per chunk: progress, not the whole file
                self.wfile.write(view[start : start + CHUNK_BYTES])

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature fixed by the standard library)
        log.debug("http %s " + format, self.client_address[0], *args)


# The client side: a peer or monitor reading a coordinator's API (no hivemind import, so refusals stay fast).


def coordinator_get(url: str, path: str, wait: float = 60.0) -> str:
    """GET ``<url>/<path>`` from a coordinator's HTTP API as text, retrying while it starts or is busy (503), with
    backoff, up to ``wait`` s."""
    address = f"{url.rstrip('/')}/{path.lstrip('/')}"
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"--coordinator {url!r} is not an HTTP address; expected http://HOST:PORT")
    deadline, pause = time.monotonic() + wait, 0.5
    while True:
        try:
            with urllib.request.urlopen(address, timeout=10) as response:
                return response.read().decode()
        except urllib.error.HTTPError as err:
            if err.code == 421:
                raise RuntimeError(
                    f"coordinator {url} does not answer for that name (HTTP 421): use its IP address, or have it "
                    "started with --http-name NAME (it refuses names it was not told, against DNS rebinding)"
                ) from err
            if err.code != 503:
                raise RuntimeError(f"coordinator {url} answered {address} with HTTP {err.code} {err.reason}") from err
            problem: object = f"HTTP 503, {err.read().decode(errors='replace').strip()}"
        except (urllib.error.URLError, OSError) as err:
            problem = getattr(err, "reason", err)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"coordinator {url} did not answer for {wait:.0f} s ({problem}); "
                "check the address and that its HTTP port is open to you"
            )
        time.sleep(pause)
        pause = min(2 * pause, 5.0)
