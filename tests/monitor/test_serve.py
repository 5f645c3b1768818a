"""The one HTTP server behind the coordinator's API and every ``/metrics``: real servers and sockets on 127.0.0.1.

Each refusal is checked on the wire (status line, headers, how soon, that the connection is closed), and after
each one the server must still answer a plain GET.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from vitpeer.peer.core.runtime.http import MAX_TARGET_BYTES, HttpServer, MetricsServer, Route

TIMEOUT = 1.0  # the servers' per-connection timeout here; the default is 10 s
MARGIN = 1.5  # seconds on top of TIMEOUT that a 2-core CI machine may take to close a connection
PROMPT = 0.8  # an answer that needs no waiting arrives within this (under TIMEOUT: no timeout involved)


def hello() -> tuple[str, str]:
    return "text/plain", "hello\n"


def failing() -> tuple[str, str]:
    raise RuntimeError("no checkpoint yet\nsecond line")


ROUTES: dict[str, Route] = {"/hello": hello, "/broken": failing}


@pytest.fixture
def server() -> Iterator[HttpServer]:
    server = HttpServer("127.0.0.1", 0, ROUTES, timeout=TIMEOUT, max_connections=4, names=())
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture
def connect() -> Iterator:
    """``connect(port)``: a client socket to 127.0.0.1:port, closed after the test whatever happens."""
    sockets: list[socket.socket] = []

    def open_one(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT + MARGIN + 5)
        sockets.append(sock)
        return sock

    try:
        yield open_one
    finally:
        for sock in sockets:
            sock.close()


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (b"" if it closes without a word); a reset counts as closed too."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def exchange(connect, port: int, request: bytes) -> tuple[int, dict[str, str], bytes, float]:
    """Send ``request`` raw, read until the server closes: (status, headers, body, seconds until closed)."""
    sock = connect(port)
    started = time.monotonic()
    sock.sendall(request)
    answer = read_all(sock)
    elapsed = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body, elapsed


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def assert_still_serving(server: HttpServer) -> None:
    assert get(f"http://127.0.0.1:{server.port}/hello") == (200, "hello\n")


def test_get_and_head_of_a_route(server: HttpServer, connect):
    code, headers, body, _ = exchange(connect, server.port, b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (code, body) == (200, b"hello\n")
    assert headers["content-type"] == "text/plain; charset=utf-8" and headers["connection"] == "close"
    assert "python" not in headers["server"].lower()
    assert headers["x-content-type-options"] == "nosniff" and "default-src 'self'" in headers["content-security-policy"]
    code, headers, body, _ = exchange(connect, server.port, b"HEAD /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (code, headers["content-length"], body) == (200, "6", b"")


@pytest.mark.parametrize("host", ["rebound.example", "rebound.example:8080", "evil.localhost"])
def test_a_host_name_it_does_not_serve_is_421(server: HttpServer, connect, host: str):
    """DNS rebinding: a page of rebound.example whose name now points here reads nothing through the browser."""
    request = f"GET /hello HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    code, _, body, _ = exchange(connect, server.port, request)
    assert (code, body) == (421, b"421 this server does not answer for that Host name\n")
    for known in ("localhost:80", "[::1]:8080", "127.0.0.1", "LOCALHOST."):
        code, _, body, _ = exchange(connect, server.port, f"GET /hello HTTP/1.1\r\nHost: {known}\r\n\r\n".encode())
        assert (code, body) == (200, b"hello\n"), known


def test_unknown_path_is_404_and_failing_route_is_a_one_line_500(server: HttpServer):
    code, body = get(f"http://127.0.0.1:{server.port}/nope")
    assert code == 404 and "/hello" in body
    code, body = get(f"http://127.0.0.1:{server.port}/broken")
    assert code == 500 and body == "RuntimeError: no checkpoint yet second line\n"
    assert_still_serving(server)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"])
def test_other_methods_are_405_with_allow(server: HttpServer, connect, method: str):
    request = f"{method} /hello HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode()
    code, headers, _, elapsed = exchange(connect, server.port, request)
    assert code == 405 and headers["allow"] == "GET, HEAD"
    assert elapsed < PROMPT
    assert_still_serving(server)


@pytest.mark.parametrize("header", ["Content-Length: 5", "Transfer-Encoding: chunked", "Content-Length: x"])
def test_a_request_body_is_413_at_once_without_reading_it(server: HttpServer, connect, header: str):
    # the body is announced but never sent: a server that waited for it would answer only at its timeout
    code, _, _, elapsed = exchange(connect, server.port, f"GET /hello HTTP/1.1\r\n{header}\r\n\r\n".encode())
    assert code == 413 and elapsed < PROMPT
    assert_still_serving(server)


def test_a_long_request_target_is_414(server: HttpServer, connect):
    path = "/hello?" + "a" * (MAX_TARGET_BYTES - len("/hello?"))
    assert exchange(connect, server.port, f"GET {path} HTTP/1.1\r\n\r\n".encode())[0] == 200  # the limit itself
    path = "/" + "a" * 2999
    code, _, _, elapsed = exchange(connect, server.port, f"GET {path} HTTP/1.1\r\n\r\n".encode())
    assert code == 414 and elapsed < PROMPT
    assert_still_serving(server)


@pytest.mark.parametrize(
    "headers",
    [
        "".join(f"X-Flood-{index}: {index}\r\n" for index in range(200)),  # more than http.server's 100
        "X-Long: " + "a" * 70_000 + "\r\n",  # longer than its 64 KiB per line
    ],
    ids=["many", "long"],
)
def test_header_floods_are_refused_with_a_4xx(server: HttpServer, connect, headers: str):
    code, _, _, elapsed = exchange(connect, server.port, f"GET /hello HTTP/1.1\r\n{headers}\r\n".encode())
    assert 400 <= code < 500 and elapsed < PROMPT
    assert_still_serving(server)


def test_a_silent_client_is_disconnected_after_the_timeout(server: HttpServer, connect):
    sock = connect(server.port)
    started = time.monotonic()
    assert read_all(sock) == b""  # closed by the server without an answer
    assert TIMEOUT - 0.1 <= time.monotonic() - started < TIMEOUT + MARGIN
    assert_still_serving(server)


def test_a_client_trickling_its_request_is_cut_off_at_the_same_deadline(server: HttpServer, connect):
    # one byte every 0.2 s would reset a plain socket timeout forever; the deadline covers the whole request
    sock = connect(server.port)
    started = time.monotonic()
    closed = False
    for byte in b"GET /hello HTTP/1.1\r\nX-Slow: " + b"a" * 100:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        sock.settimeout(0.2)
        try:
            if sock.recv(1) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except ConnectionResetError:
            closed = True
            break
    assert closed and time.monotonic() - started < TIMEOUT + MARGIN
    assert_still_serving(server)


def test_connections_beyond_the_limit_get_503_at_once_until_slots_free():
    server = HttpServer("127.0.0.1", 0, ROUTES, timeout=TIMEOUT, max_connections=2)
    idle: list[socket.socket] = []
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as third:
            started = time.monotonic()
            third.sendall(b"GET /hello HTTP/1.1\r\n\r\n")
            answer = read_all(third)
        assert answer.startswith(b"HTTP/1.0 503 ") and time.monotonic() - started < PROMPT
        assert b"Retry-After: 1" in answer

        # the idle clients are dropped at the timeout; then the slots serve again
        assert all(read_all(sock) == b"" for sock in idle)
        assert_still_serving(server)
        assert_still_serving(server)
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()


def test_shutdown_cuts_open_connections_and_frees_the_port(connect):
    server = HttpServer("127.0.0.1", 0, ROUTES, timeout=30)
    try:
        sock = connect(server.port)
        time.sleep(0.2)  # accepted and waiting for its request
    finally:
        started = time.monotonic()
        server.shutdown()
    assert read_all(sock) == b"" and time.monotonic() - started < 2
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


@pytest.fixture
def metrics() -> Iterator[MetricsServer]:
    registry = CollectorRegistry()
    Counter("vitpeer_test_answers", "Answers given in this test.", registry=registry).inc(3)
    server = MetricsServer(registry, "127.0.0.1", 0, timeout=TIMEOUT)
    try:
        yield server
    finally:
        server.shutdown()


def test_metrics_server_serves_the_registry_in_prometheus_text(metrics: MetricsServer):
    assert metrics.url == f"http://127.0.0.1:{metrics.port}/metrics"
    with urllib.request.urlopen(metrics.url, timeout=5) as response:
        content_type, text = response.headers["Content-Type"], response.read().decode()
    assert content_type.startswith("text/plain; version=")
    samples = {
        sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples
    }
    assert samples["vitpeer_test_answers_total"] == 3.0
    assert get(metrics.url.removesuffix("/metrics") + "/hello")[0] == 404  # its only route is /metrics


def test_metrics_server_has_the_same_limits(metrics: MetricsServer, connect):
    request = b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    code, headers, _, _ = exchange(connect, metrics.port, request)
    assert code == 405 and headers["allow"] == "GET, HEAD"
    started = time.monotonic()
    assert read_all(connect(metrics.port)) == b"" and time.monotonic() - started < TIMEOUT + MARGIN


def test_metrics_server_on_a_taken_port_names_it(metrics: MetricsServer):
    with pytest.raises(RuntimeError, match=f"cannot serve metrics on 127.0.0.1:{metrics.port} .*--metrics-port"):
        MetricsServer(CollectorRegistry(), "127.0.0.1", metrics.port)


def test_a_large_response_reaches_a_slow_client_however_long_it_takes():
    """16 MB (more than the kernel's socket buffers hold) read at a few MB/s: seconds in all, several times the
    server's timeout; each chunk leaves within it, so nothing is cut (one ``sendall`` of the whole body was: its
    timeout covers the whole call)."""
    body = bytes(range(256)) * (16 * 4096)
    server = HttpServer("127.0.0.1", 0, {"/big": lambda: ("application/octet-stream", body)}, timeout=TIMEOUT)
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            sock.settimeout(TIMEOUT + MARGIN + 5)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            started, received = time.monotonic(), b""
            while chunk := sock.recv(1 << 16):
                received += chunk
                time.sleep(0.012)
        head, _, data = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 ") and data == body, (head, len(data))
        assert time.monotonic() - started > TIMEOUT + MARGIN  # it really took longer than the timeout
    finally:
        server.shutdown()


def test_metrics_answer_whatever_host_name_prometheus_scrapes_them_by():
    registry = CollectorRegistry()
    server = MetricsServer(registry, "127.0.0.1", 0, timeout=TIMEOUT)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: peer-1:9470\r\n\r\n")
            assert read_all(sock).startswith(b"HTTP/1.0 200 ")
    finally:
        server.shutdown()
