"""The coordinator's HTTP API, the config it shares with peers, and ``vitpeer join --coordinator``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from builders import peer_report
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from keys import Keyring, guarded_and_attacker
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from vitpeer.coordinator.api import ApiServer, Route, page_routes
from vitpeer.coordinator.config import CoordinatorConfig
from vitpeer.coordinator.run import Coordinator
from vitpeer.monitor.swarm import SwarmCollector
from vitpeer.peer.core.config import ConfigError, RunConfig, SwarmConfig, TrainerConfig, load_config, validated
from vitpeer.peer.core.config.options import join_config
from vitpeer.peer.core.runtime.http import coordinator_get
from vitpeer.peer.core.swarm.dht import default_route_ip
from vitpeer.peer.core.swarm.records import (
    REPORT_TTL,
    aggregate,
    metrics_key,
    record_validators,
    rejected_records,
    signer_id,
)

ID_A = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"  # well-formed peer ids (initial_peers are validated)
PEER_A = f"/ip4/1.2.3.4/tcp/31337/p2p/{ID_A}"
PEER_B = "/ip4/5.6.7.8/tcp/31337/p2p/QmQCU2EcMqAqQPR2i9bChDtGNJchTbq5TbXJJ16u19uLTa"


def serve(routes: dict[str, Route]) -> Iterator[str]:
    server = ApiServer("127.0.0.1", 0, routes)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()


def failing() -> tuple[str, str]:
    raise RuntimeError("no checkpoint yet")


@pytest.fixture
def api() -> Iterator[str]:
    routes: dict[str, Route] = {
        "/initial-peers": lambda: ("text/plain", f"{PEER_A}\n"),
        "/status": lambda: ("application/json", json.dumps({"swarm_epoch": 12, "peers": 2})),
        "/broken": failing,
    }
    yield from serve(routes)


@pytest.fixture
def coordinator() -> Iterator[str]:
    shared = RunConfig(swarm=SwarmConfig(run_id="from-coord")).for_peers().to_yaml()
    routes: dict[str, Route] = {
        "/config": lambda: ("application/yaml", shared),
        "/initial-peers": lambda: ("text/plain", f"{PEER_A}\n{PEER_B}\n"),
    }
    yield from serve(routes)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_routes_answer_with_their_body_and_content_type(api: str):
    assert get(f"{api}/initial-peers") == (200, "text/plain; charset=utf-8", f"{PEER_A}\n")
    code, content_type, body = get(f"{api}/status/?verbose=1")
    assert (code, content_type) == (200, "application/json; charset=utf-8")
    assert json.loads(body) == {"swarm_epoch": 12, "peers": 2}


def test_unknown_path_is_404_listing_the_paths(api: str):
    code, _, body = get(f"{api}/nope")
    assert code == 404
    assert all(path in body for path in ("/initial-peers", "/status", "/broken"))


def test_failing_route_is_500_and_the_server_keeps_serving(api: str):
    code, _, body = get(f"{api}/broken")
    assert code == 500 and "no checkpoint yet" in body
    assert get(f"{api}/initial-peers")[0] == 200


def test_best_model_is_404_until_a_checkpoint_is_evaluated_then_served(tmp_path: Path):
    server = serve(page_routes(tmp_path))
    url = next(server)
    try:
        code, _, body = get(f"{url}/best/model.safetensors")
        assert code == 404 and body == "no model.safetensors yet: no checkpoint has been evaluated\n"
        (tmp_path / "best").mkdir()
        (tmp_path / "best" / "model.safetensors").write_bytes(b"weights")
        assert get(f"{url}/best/model.safetensors")[0] == 200
    finally:
        server.close()


def test_coordinator_get_returns_the_body(api: str):
    assert coordinator_get(api + "/", "initial-peers", wait=5) == f"{PEER_A}\n"


HANGING = """
import socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
def hang():
    sock = socket.socket()
    sock.bind(("127.0.0.2", 0))  # another host, as far as the server can tell
    sock.connect(("127.0.0.1", port))
    return sock
held = [hang() for _ in range(count)]
print("holding", flush=True)
while True:  # half of them send a byte a second and never finish the request; a closed one is opened again
    for index, sock in enumerate(held):
        try:
            if index % 2:
                sock.send(b"G")
        except OSError:
            sock.close()
            held[index] = hang()
    time.sleep(1)
"""


def test_64_hanging_connections_do_not_stop_initial_peers_answering(coordinator: str):
    """A real attacker process holds 64 connections (idle and trickling, reopened when cut) from another address;
    ``join --coordinator`` reads ``/initial-peers`` within 5 s all along, for longer than the server's timeout."""
    port = int(coordinator.rsplit(":", 1)[1])
    attacker = subprocess.Popen(
        [sys.executable, "-c", HANGING, str(port), "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert attacker.stdout is not None and attacker.stdout.readline() == "holding\n", attacker.stderr
        waits = []
        deadline = time.monotonic() + 12  # past the server's 10 s timeout: the cut connections are reopened
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert coordinator_get(coordinator, "/initial-peers", wait=5) == f"{PEER_A}\n{PEER_B}\n"
            waits.append(time.monotonic() - started)
            time.sleep(0.5)
        assert attacker.poll() is None, attacker.stderr  # it held on the whole time
        assert max(waits) < 5, waits
    finally:
        attacker.kill()
        attacker.wait()


def test_coordinator_get_gives_up_on_a_closed_port_naming_the_url():
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(RuntimeError, match=url):
        coordinator_get(url, "/config", wait=2)


def test_coordinator_get_refuses_a_non_http_url():
    with pytest.raises(ValueError, match="not an HTTP address"):
        coordinator_get("127.0.0.1:8470", "/config", wait=2)


def test_shared_config_leaves_out_this_hosts_addresses_and_paths():
    host = RunConfig(
        swarm=SwarmConfig(
            run_id="shared-run",
            initial_peers=[PEER_A],
            host_port=31337,
            host_maddrs=["/ip4/10.0.0.5/tcp/31337"],
            announce_ip="203.0.113.5",
            announce_maddrs=["/ip4/203.0.113.5/tcp/31337"],
            identity_path=Path("/srv/secret/identity.key"),
            client_mode=True,
            target_batch_size=4096,
        ),
        trainer=TrainerConfig(output_dir=Path("/srv/runs/mine"), max_steps=700),
    )
    host.model.name = "vit_base_patch32_224"
    shared = host.for_peers()

    default = SwarmConfig()
    assert shared.swarm.initial_peers == [] and shared.swarm.host_port == default.host_port
    assert shared.swarm.host_maddrs is None and shared.swarm.announce_maddrs == []
    assert shared.swarm.announce_ip is None and shared.swarm.identity_path is None and not shared.swarm.client_mode
    assert shared.trainer.output_dir == TrainerConfig().output_dir
    assert shared.swarm.run_id == "shared-run" and shared.swarm.target_batch_size == 4096
    assert shared.model == host.model and shared.trainer.max_steps == 700

    text = shared.to_yaml()
    for private in ("10.0.0.5", "203.0.113.5", "/srv/secret", "/srv/runs", ID_A):
        assert private not in text
    assert load_config(text=text) == shared


def test_default_coordinator_api_serves_this_host_only():
    host = CoordinatorConfig().http_host
    assert host == "127.0.0.1"
    server = ApiServer(host, 0, {"/status": lambda: ("application/json", "{}")})
    try:
        assert server.server.server_address[0] == "127.0.0.1"
        assert get(f"http://127.0.0.1:{server.port}/status")[0] == 200
        other = default_route_ip()  # this host's address on its network, when it has one
        if other is not None and not other.startswith("127."):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other, server.port), timeout=2).close()
    finally:
        server.shutdown()


def test_coordinator_without_any_checkpoint_schedule_is_refused():
    given = {"checkpoint_every_steps": 0, "checkpoint_every_minutes": 0}
    with pytest.raises(ConfigError, match="no checkpoint would ever be written"):
        validated(CoordinatorConfig, given, "command line")
    assert validated(CoordinatorConfig, {"checkpoint_every_steps": 0}, "command line").checkpoint_every_minutes > 0


def test_coordinator_swarm_is_the_first_node_with_a_fixed_port_and_identity(tmp_path: Path):
    coord = CoordinatorConfig(state_dir=tmp_path, host_port=4101)
    swarm = coord.swarm(SwarmConfig(run_id="r", initial_peers=[PEER_A], client_mode=True))
    assert swarm.initial_peers == [] and swarm.host_port == 4101 and not swarm.client_mode
    assert swarm.identity_path == tmp_path / "identity.key"
    assert swarm.run_id == "r"


def test_join_takes_config_and_initial_peers_from_the_coordinator(coordinator: str):
    config = join_config(None, coordinator, {})
    assert config.swarm.run_id == "from-coord"
    assert config.swarm.initial_peers == [PEER_A, PEER_B]


def test_join_with_another_run_id_than_the_coordinators_is_refused(coordinator: str):
    with pytest.raises(click.ClickException) as refused:  # BadInput or UsageError: one line, no traceback
        join_config("digits_tiny", coordinator, {})
    ours = load_config("digits_tiny").swarm.run_id
    assert ours != "from-coord"
    assert ours in refused.value.message and "from-coord" in refused.value.message


def test_join_flags_override_the_coordinators_config(coordinator: str):
    config = join_config(None, coordinator, {"batch_size": 7, "initial_peers": (PEER_B,)})
    assert config.data.batch_size == 7
    assert config.swarm.initial_peers == [PEER_B]
    assert config.swarm.run_id == "from-coord"


def test_status_shows_the_runs_algorithm_and_what_the_swarm_cost_its_peers(tmp_path: Path):
    config = RunConfig(swarm=SwarmConfig(run_id="costs", algorithm="diloco"))
    coordinator = Coordinator(config, CoordinatorConfig(state_dir=tmp_path))
    coordinator.state = SimpleNamespace(epoch=3)  # what a started coordinator holds; /status reads only its epoch

    # Alice: 4 rounds, all averaged, 8 MB sent (2 MB a round), 6 s averaging, 2 s blocked against 14 s computing.
    # Bob: 4 rounds, one failed, 3 MB (1 MB a round), 3 s averaging, 6 s blocked against 10 s computing. Their
    # records say "gradient": /status shows the run's own algorithm (the fingerprint keeps the two equal).
    alice = peer_report(peer_id="alice", algorithm="gradient", rounds=4, averaged_rounds=4, sent_bytes=8_000_000,
                        averaging_seconds=6.0, wait_seconds=2.0, compute_seconds=14.0)  # fmt: skip
    bob = peer_report(peer_id="bob", algorithm="gradient", rounds=4, averaged_rounds=3, failed_rounds=1,
                      sent_bytes=3_000_000, averaging_seconds=3.0, wait_seconds=6.0, compute_seconds=10.0)  # fmt: skip
    coordinator.swarm = aggregate([alice, bob])
    server = ApiServer("127.0.0.1", 0, coordinator.routes())
    try:
        code, _, body = get(f"http://127.0.0.1:{server.port}/status")
    finally:
        server.shutdown()
    assert code == 200
    status = json.loads(body)
    assert (status["run_id"], status["algorithm"], status["alive_peers"]) == ("costs", "diloco", 2)
    assert status["communication"] == {
        "rounds": 8,
        "averaged_rounds": 7,
        "failed_rounds": 1,
        "sent_bytes": 11_000_000,
        "averaging_seconds": 9.0,
        "wait_seconds": 8.0,
        "compute_seconds": 24.0,
        "sent_bytes_per_round": 11_000_000 / 7,
        "averaging_seconds_per_round": 9.0 / 7,
        "compute_seconds_per_round": 3.0,
        "wait_ratio": 0.25,
    }
    peers = {peer["peer_id"]: peer for peer in status["peers"]}
    assert {name: peers["alice"][name] for name in ("sent_bytes_per_round", "averaging_seconds_per_round")} == {
        "sent_bytes_per_round": 2_000_000,
        "averaging_seconds_per_round": 1.5,
    }
    assert (peers["alice"]["compute_seconds_per_round"], peers["alice"]["wait_ratio"]) == (3.5, 0.125)
    assert (peers["bob"]["sent_bytes_per_round"], peers["bob"]["wait_ratio"]) == (1_000_000, 0.375)
    assert peers["bob"]["failed_rounds"] == 1


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.timeout(60)
def test_a_peer_cannot_replace_anothers_row_nor_skew_the_swarm_past_its_bounds(tmp_path: Path):
    """A malicious peer, with keys of its own, (a) claims the victim's peer id in a newer, well-formed record, and
    (b) publishes an infinite and a NaN loss, a huge window to dominate the swarm loss, a time a day ahead and an
    absurd throughput. The coordinator's node refuses (b) and counts it; /status and /metrics keep the victim's row
    as published and show the impostor as a row of its own signer."""
    run_id = "hostile-records"
    keyring = Keyring(7)
    with guarded_and_attacker(record_validators(run_id), [keyring]) as (guarded, attacker):
        key, now = metrics_key(run_id), get_dht_time()

        def record(**claims) -> dict:
            return {**peer_report(peer_id=ID_A, time=now).dict(), **claims}

        victim = RSASignatureValidator().local_public_key  # the coordinator's node signs with this process's key
        assert guarded.store(key, subkey=victim, value=record(), expiration_time=now + REPORT_TTL)
        attacks = [
            (record(loss=0.7, samples_per_second=12.0, time=now + 1), now + 1 + REPORT_TTL),  # (a) a newer claim
            (record(loss=float("inf")), now + REPORT_TTL),
            (record(loss=float("nan")), now + REPORT_TTL),
            (record(loss=9e3, window_samples=10**12, samples=10**12), now + REPORT_TTL),
            (record(loss=9e3, time=now + 86_400), now + 86_400 + REPORT_TTL),
            (record(samples_per_second=1e12), now + REPORT_TTL),
            (record(loss=9e3), now + 365 * 86_400),  # kept alive for a year
        ]
        for subkey, (value, expiration) in zip(keyring.keys, attacks, strict=True):
            attacker.store(key, subkey=subkey, value=value, expiration_time=expiration)
        assert rejected_records(guarded) == {"signature": 0, "schema": len(attacks) - 1}

        coordinator = Coordinator(RunConfig(swarm=SwarmConfig(run_id=run_id)), CoordinatorConfig(state_dir=tmp_path))
        coordinator.dht, coordinator.maddrs = guarded, []
        coordinator.state = SimpleNamespace(epoch=100)  # ahead of the records' steps: no checkpoint is due
        coordinator.registry = CollectorRegistry()
        coordinator.registry.register(SwarmCollector(coordinator.status))
        coordinator.poll()
        server = ApiServer("127.0.0.1", 0, coordinator.routes())
        try:
            code, _, body = get(f"http://127.0.0.1:{server.port}/status")
            assert code == 200
            status = json.loads(body)  # strict JSON: an Infinity or NaN anywhere would not parse
            metrics = metric_samples(get(f"http://127.0.0.1:{server.port}/metrics")[2])
        finally:
            server.shutdown()

    assert status["rejected_records"]["schema"] >= len(attacks) - 1
    rows = {row["signer"]: row for row in status["peers"]}
    assert set(rows) == {signer_id(victim), signer_id(keyring.keys[0])}
    assert {row["peer_id"] for row in rows.values()} == {ID_A}  # one claimed id, two rows
    assert {k: rows[signer_id(victim)][k] for k in ("loss", "samples_per_second", "time")} == {
        "loss": 0.5,
        "samples_per_second": 10.0,
        "time": now,
    }
    assert (status["alive_peers"], status["loss"], status["samples_per_second"]) == (2, 0.6, 22.0)
    assert metrics[("vitpeer_swarm_loss", ())] == 0.6 and metrics[("vitpeer_swarm_samples_per_second", ())] == 22.0
    for signer, loss in ((signer_id(victim), 0.5), (signer_id(keyring.keys[0]), 0.7)):
        assert metrics[("vitpeer_swarm_peer_loss", (("peer_id", ID_A), ("signer", signer)))] == loss
    assert metrics[("vitpeer_rejected_records_total", (("reason", "schema"),))] >= len(attacks) - 1
