"""The local monitoring stack: ``monitor/compose.yaml``, ``monitor/prometheus.yml``, Grafana's provisioning and the
``Dockerfile``, checked against each other (no Docker engine needed): every scrape target is a service listening on
that port, every mounted path exists, Grafana finds the dashboards where they are mounted, and the image's
HEALTHCHECK passes exactly when /metrics answers.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MONITOR = REPO / "monitor"
COMPOSE = MONITOR / "compose.yaml"
PROMETHEUS_CONFIG = MONITOR / "prometheus.yml"
PROVISIONING = MONITOR / "grafana" / "provisioning"
DASHBOARDS = MONITOR / "grafana" / "dashboards"
DOCKERFILE = REPO / "Dockerfile"
PORT_FLAGS = ("--http-port", "--metrics-port")  # coordinator's API (serves /metrics), a peer's exporter


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def services() -> dict[str, dict[str, Any]]:
    return load_yaml(COMPOSE)["services"]


def command(service: dict[str, Any]) -> list[str]:
    value = service.get("command", [])
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def option(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume entry, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        out.append((source, target))
    return out


def is_host_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def scrape_targets() -> list[tuple[str, str, str]]:
    """(job, host, port) of every static target in monitor/prometheus.yml."""
    out = []
    for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                out.append((job["job_name"], host, port))
    return out


def dashboard_provider_paths() -> list[str]:
    paths = []
    for path in sorted((PROVISIONING / "dashboards").glob("*.y*ml")):
        config = load_yaml(path)
        assert config["apiVersion"] == 1, path
        paths += [provider["options"]["path"] for provider in config["providers"] if provider["type"] == "file"]
    return paths


def datasources() -> list[dict[str, Any]]:
    found = []
    for path in sorted((PROVISIONING / "datasources").glob("*.y*ml")):
        config = load_yaml(path)
        assert config["apiVersion"] == 1, path
        found += config["datasources"]
    return found


def test_compose_has_the_stack() -> None:
    assert {"coordinator", "peer-1", "peer-2", "prometheus", "grafana"} <= services().keys()
    for name in ("coordinator", "peer-1", "peer-2"):
        service = services()[name]
        assert service["image"] == "vitpeer:latest"
        assert service["build"] == {"context": "..", "dockerfile": "Dockerfile"}
        assert any(target == "/data" for _, target in mounts(service)), f"{name} keeps no /data volume"
    assert command(services()["coordinator"])[0] == "coordinator"
    assert [command(services()[peer])[0] for peer in ("peer-1", "peer-2")] == ["join", "join"]


def test_every_scrape_target_is_a_service_listening_there() -> None:
    targets = scrape_targets()
    assert {job for job, _, _ in targets} == {"vitpeer-coordinator", "vitpeer-peer"}
    for job, host, port in targets:
        assert host in services(), f"{job} scrapes {host}, which is no compose service"
        listening = {option(command(services()[host]), flag) for flag in PORT_FLAGS} - {None}
        assert port in listening, f"{job} scrapes {host}:{port}, but {host} serves /metrics on {listening or 'no port'}"


def test_peers_reach_the_coordinator_api() -> None:
    api_port = option(command(services()["coordinator"]), "--http-port")
    for name in ("peer-1", "peer-2"):
        url = urlsplit(option(command(services()[name]), "--coordinator") or "")
        assert (url.hostname, str(url.port)) == ("coordinator", api_port), name
        assert "coordinator" in services()[name].get("depends_on", {}), name


def test_healthchecks_probe_the_port_that_serves_metrics() -> None:
    """The image's HEALTHCHECK reads $VITPEER_METRICS_PORT (default 9470): the coordinator serves on its API port."""
    for name in ("coordinator", "peer-1", "peer-2"):
        service = services()[name]
        probed = str(service.get("environment", {}).get("VITPEER_METRICS_PORT", "9470"))
        listening = {option(command(service), flag) for flag in PORT_FLAGS} - {None}
        assert probed in listening, f"{name}: the healthcheck probes {probed}, /metrics is on {listening}"


def test_every_mounted_host_path_exists() -> None:
    declared = set(load_yaml(COMPOSE).get("volumes") or {})
    for name, service in services().items():
        for source, target in mounts(service):
            if is_host_path(source):
                assert (COMPOSE.parent / source).resolve().exists(), f"{name} mounts {source}, missing, onto {target}"
            else:
                assert source in declared, f"{name} uses volume {source!r}, not declared under volumes:"
        build = service.get("build")
        if build:
            context = COMPOSE.parent / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name} builds from no Dockerfile"


def test_prometheus_and_grafana_mounts() -> None:
    prometheus = {(COMPOSE.parent / source).resolve(): target for source, target in mounts(services()["prometheus"])}
    assert prometheus[PROMETHEUS_CONFIG.resolve()] == "/etc/prometheus/prometheus.yml"
    grafana = {(COMPOSE.parent / source).resolve(): target for source, target in mounts(services()["grafana"])}
    assert grafana[PROVISIONING.resolve()] == "/etc/grafana/provisioning"
    environment = services()["grafana"]["environment"]
    assert str(environment["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert "3000:3000" in services()["grafana"]["ports"]
    assert "9090:9090" in services()["prometheus"]["ports"]


def test_grafana_provider_reads_where_compose_mounts_the_dashboards() -> None:
    mounted = {(COMPOSE.parent / source).resolve(): target for source, target in mounts(services()["grafana"])}
    assert dashboard_provider_paths() == [mounted[DASHBOARDS.resolve()]]
    home = services()["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        relative = Path(home).relative_to(mounted[DASHBOARDS.resolve()])
        assert (DASHBOARDS / relative).is_file(), home


def test_datasource_is_compose_prometheus_and_dashboards_do_not_hard_code_it() -> None:
    (datasource,) = datasources()
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.hostname in services()
    assert datasource["uid"] == "vitpeer-prometheus"
    for path in sorted(DASHBOARDS.glob("*.json")):
        text = path.read_text()
        assert datasource["uid"] not in text, f"{path.name} hard-codes the provisioned datasource uid"
        uids = set(re.findall(r'"datasource":\s*\{[^{}]*"uid":\s*"([^"]*)"', text))
        assert uids == {"${datasource}"}, f"{path.name} names datasources {uids}"
        json.loads(text)


# --- the image's HEALTHCHECK --------------------------------------------------------------------------------------


def healthcheck() -> list[str]:
    """The exec-form HEALTHCHECK command of the Dockerfile, with `python` as this interpreter."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("HEALTHCHECK")]
    argv = json.loads(line[line.index("CMD") + len("CMD") :])
    assert argv[0] == "python", "exec form: no shell, no curl"
    return [sys.executable, *argv[1:]]


def run_healthcheck(port: int) -> int:
    environment = {**os.environ, "VITPEER_METRICS_PORT": str(port)}
    return subprocess.run(healthcheck(), env=environment, capture_output=True, timeout=30).returncode


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/metrics"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"vitpeer_gpus 0\n" if ok else b"")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def metrics_server() -> Any:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_healthcheck_passes_while_metrics_answer(metrics_server: Any) -> None:
    assert run_healthcheck(metrics_server.server_address[1]) == 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert run_healthcheck(port) != 0


def test_dockerfile_exposes_the_ports_compose_uses() -> None:
    text = DOCKERFILE.read_text()
    (expose,) = re.findall(r"^EXPOSE (.+)$", text, re.MULTILINE)
    exposed = set(expose.split())
    for name in ("coordinator", "peer-1", "peer-2"):
        args = command(services()[name])
        used = {option(args, flag) for flag in (*PORT_FLAGS, "--host-port")} - {None}
        assert used <= exposed, f"{name} listens on {used - exposed}, not EXPOSEd"
    assert re.search(r'^ENTRYPOINT \["vitpeer"\]$', text, re.MULTILINE)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.MULTILINE), "runs as root"
