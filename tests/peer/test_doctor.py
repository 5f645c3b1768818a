"""``vitpeer doctor``: the real command in a subprocess, on this CPU host, against live, silent and missing peers.

Each run imports torch, Lightning and hivemind and starts a p2p daemon (6-10 s on a loaded 2-core host), so the
cases that must see the whole command run it; checks that need no process are tested in this one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vitpeer.peer.commands import doctor, doctor_host, doctor_swarm
from vitpeer.peer.core.config import peer_multiaddr_problem

ROOT = Path(__file__).resolve().parents[2]
DEAD_PEER_ID = "12D3KooWMDNVJKmcbMXyCtbGCidASwAV1xnjExXHgsbYsDdHkANH"
"""A real peer id, printed by a DHT that has since shut down: syntactically valid, nobody answers to it."""


def run_doctor(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """``vitpeer doctor ARGS`` as a volunteer runs it; ``subprocess.run`` kills it if it outlives ``timeout``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("VITPEER_")}
    return subprocess.run(
        [sys.executable, "-c", "from vitpeer.peer.commands.doctor import command; command()", *args],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def line(result: subprocess.CompletedProcess, name: str) -> str:
    """The printed line of check ``name`` (``status  name  detail``)."""
    found = re.search(rf"^(ok|warn|FAIL) +{re.escape(name)}  .*$", result.stdout, re.MULTILINE)
    assert found, f"no {name!r} line in:\n{result.stdout}\n{result.stderr}"
    return found.group(0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(120)
def test_plain_run_on_a_cpu_host_passes_with_a_cpu_warning():
    import torch

    result = run_doctor()
    assert result.returncode == 0, result.stdout + result.stderr
    assert line(result, "torch").startswith("ok") and torch.__version__ in line(result, "torch")
    assert line(result, "p2p daemon").startswith("ok")
    assert re.search(r"started in \d+\.\d s", line(result, "p2p daemon"))
    if not torch.cuda.is_available():
        assert line(result, "cuda").startswith("warn") and "runs on CPU (slow)" in line(result, "cuda")
        assert line(result, "bf16").startswith("ok")
    assert result.stdout.splitlines()[-1].startswith("doctor: ") and "0 FAIL" in result.stdout.splitlines()[-1]


@pytest.mark.timeout(120)
def test_busy_ports_fail_naming_the_port_and_a_way_out():
    with socket.socket() as p2p, socket.socket() as metrics:
        p2p.bind(("127.0.0.1", 0))
        p2p.listen()
        metrics.bind(("127.0.0.1", 0))
        metrics.listen()
        p2p_port, metrics_port = p2p.getsockname()[1], metrics.getsockname()[1]
        result = run_doctor("--host-port", str(p2p_port), "--metrics-port", str(metrics_port))
    assert result.returncode == 1, result.stdout + result.stderr
    host = line(result, "host port")
    assert host.startswith("FAIL") and f"TCP {p2p_port} is busy" in host and "--host-port" in host
    metrics_line = line(result, "metrics port")
    assert metrics_line.startswith("FAIL") and f"TCP {metrics_port} is busy" in metrics_line
    assert "--metrics-port" in metrics_line


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_live_peer_answers():
    import hivemind

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        maddrs = [str(addr) for addr in dht.get_visible_maddrs()]
        result = run_doctor("--initial-peers", ",".join(maddrs), "--timeout", "15")
    finally:
        dht.shutdown()
    assert result.returncode == 0, result.stdout + result.stderr
    peers = line(result, "initial peers")
    assert peers.startswith("ok") and f"{len(maddrs)} of {len(maddrs)} answered" in peers
    assert "reachability" not in result.stdout and "--client-mode" not in result.stdout  # same host: no NAT advice


@pytest.mark.timeout(120)
def test_a_missing_peer_fails_fast():
    """Nothing listens on the port: the connection is refused and the daemon gives up at once."""
    started = time.monotonic()
    result = run_doctor("--initial-peers", f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{DEAD_PEER_ID}", "--timeout", "5")
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert line(result, "initial peers").startswith("FAIL") and "no answer" in line(result, "initial peers")
    assert elapsed < 25, f"took {elapsed:.0f} s"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_silent_peer_and_coordinator_are_bounded_by_the_timeout():
    """A port that accepts connections and never says a word (a hung host) is the worst case: both waits run out,
    at the same time (the coordinator is asked while the peer is dialed)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        held: list[socket.socket] = []
        threading.Thread(target=lambda: [held.append(silent.accept()[0]) for _ in range(16)], daemon=True).start()
        args = ["--initial-peers", f"/ip4/127.0.0.1/tcp/{port}/p2p/{DEAD_PEER_ID}", "--timeout", "5"]
        started = time.monotonic()
        try:
            result = run_doctor(*args, "--coordinator", f"http://127.0.0.1:{port}")
        finally:
            for connection in held:
                connection.close()
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert line(result, "initial peers").startswith("FAIL")
    assert line(result, "coordinator").startswith("FAIL") and "within 5 s" in line(result, "coordinator")
    assert elapsed < 25, f"took {elapsed:.0f} s"


@pytest.mark.timeout(120)
def test_a_malformed_multiaddr_fails_naming_it():
    result = run_doctor("--initial-peers", "127.0.0.1:31337")
    assert result.returncode == 1, result.stdout + result.stderr
    bad = line(result, "initial peer")
    assert bad.startswith("FAIL") and "'127.0.0.1:31337'" in bad and "/ip4/HOST/tcp/PORT/p2p/PEER_ID" in bad


@pytest.mark.timeout(120)
def test_an_absent_coordinator_fails_in_bounded_time():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_doctor("--coordinator", url, "--timeout", "1")
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    found = line(result, "coordinator")
    assert found.startswith("FAIL") and url in found and "did not answer" in found
    assert elapsed < 25, f"took {elapsed:.0f} s"


@pytest.mark.timeout(120)
def test_json_output_parses():
    result = run_doctor("--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = json.loads(result.stdout)
    assert all(set(check) == {"name", "status", "detail"} for check in checks)
    assert all(check["status"] in ("ok", "warn", "FAIL") for check in checks)
    assert [check["status"] for check in checks if check["name"] == "p2p daemon"] == ["ok"]


# --- in this process: no p2p daemon needed -------------------------------------------------------------------------


def test_help_is_fast_and_imports_neither_torch_nor_hivemind():
    code = "import sys, vitpeer.peer.commands.doctor; print(sorted({'torch', 'hivemind'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
    from click.testing import CliRunner

    help_text = CliRunner().invoke(doctor.command, ["--help"]).output
    assert "Example" in help_text and "--initial-peers" in help_text and "--timeout" in help_text


@pytest.mark.parametrize(
    "addr, says",
    [
        ("127.0.0.1:31337", "starts with /"),
        ("/ip4/1.2.3.4/tcp/31337", "no /p2p/PEER_ID"),
        ("/ip4/999.1.2.3/tcp/31337/p2p/" + DEAD_PEER_ID, "not IPv4"),
        ("/ip4/1.2.3.4/tcp/31337/p2p/QmBad", "p2p"),
        ("/ip4/1.2.3.4/p2p/" + DEAD_PEER_ID, "no /tcp/PORT"),
    ],
)
def test_multiaddr_problems_are_named(addr: str, says: str):
    problem = peer_multiaddr_problem(addr)
    assert problem is not None and says in problem
    assert peer_multiaddr_problem(f"/ip4/1.2.3.4/tcp/31337/p2p/{DEAD_PEER_ID}") is None


def test_gpu_hosts_report_nccl_and_each_gpu(monkeypatch):
    """The GPU branch, on a host without one: torch.cuda answers as a 2-GPU host would (one of them pre-Ampere)."""
    import contextlib

    import torch

    gpus = [("NVIDIA H100 80GB HBM3", 9, 0), ("Tesla V100-SXM2-16GB", 7, 0)]
    current = {"index": 0}

    @contextlib.contextmanager
    def device(index: int):
        current["index"] = index
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: gpus[current["index"]][1] >= 8)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 21, 5))
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: SimpleNamespace(name=gpus[i][0], total_memory=80 * 2**30, major=gpus[i][1], minor=gpus[i][2]),
    )
    checks = {check.name: check for check in doctor_host.check_torch()}
    assert checks["cuda"].status == "ok" and "2 GPUs" in checks["cuda"].detail
    assert checks["nccl"] == doctor_host.Check("nccl", "ok", "2.21.5")
    assert checks["gpu 0"].status == "ok" and "H100" in checks["gpu 0"].detail
    assert "bf16 supported" in checks["gpu 0"].detail
    assert checks["gpu 1"].status == "warn" and "--precision 32" in checks["gpu 1"].detail


@pytest.mark.gpu
def test_real_gpus_are_listed():
    import torch

    checks = {check.name: check for check in doctor_host.check_torch()}
    assert checks["cuda"].status == "ok"
    assert all(f"gpu {index}" in checks for index in range(torch.cuda.device_count()))


def test_a_port_in_use_suggests_a_free_one():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        [found] = doctor_host.check_port("metrics port", port, "127.0.0.1", "--metrics-port")
    assert found.status == "FAIL" and str(port) in found.detail and "--metrics-port 0" in found.detail
    assert doctor_host.check_port("metrics port", 0, "127.0.0.1", "--metrics-port") == []
    assert doctor_host.check_port("metrics port", None, "127.0.0.1", "--metrics-port") == []


@pytest.mark.timeout(60)
def test_a_coordinator_reports_its_run_and_peers():
    """The answering side, in this process: a stand-in coordinator serving /status as ``vitpeer coordinator`` does."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    status = {"run_id": "vitpeer-digits", "peers": [{"peer_id": "a"}, {"peer_id": "b"}], "alive_peers": 2}

    class Status(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(status).encode() if self.path == "/status" else b"{}"
            self.send_response(200 if self.path == "/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        [found] = doctor_swarm.check_coordinator_status(f"http://127.0.0.1:{server.server_port}", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert found.status == "ok", found
    assert "run 'vitpeer-digits'" in found.detail and "2 peers listed" in found.detail


def test_client_mode_needs_no_reachable_address():
    """Joining in client mode, nobody has to dial this host: the reachability check says so, whatever the peers.
    (Behind a real NAT it tells you to use --client-mode: ``test_nat.py``.)"""
    peer = f"/ip4/11.77.0.1/tcp/31337/p2p/{DEAD_PEER_ID}"
    [found] = doctor_swarm.check_reachability([peer], client_mode=True)
    assert found.status == "ok" and "client mode" in found.detail
    assert doctor_swarm.check_reachability([f"/ip4/127.0.0.1/tcp/31337/p2p/{DEAD_PEER_ID}"], client_mode=False) == []
