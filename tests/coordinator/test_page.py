"""The coordinator's live page (``GET /``), its data (``/history.json``, ``/best/...``) and ``vitpeer status``.

One scenario for the module: a real coordinator, two real peers training, and a test DHT node that adds 100 signed
records of made-up peers, one of which carries HTML and a terminal escape sequence in its hardware string. A real
headless browser (Debian's ``chromium``) renders the page; those tests (marker ``browser``) skip, in one line, where
it is not installed, and fail with that line in CI (``tests/ci_tools.py``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hivemind
import pytest
from builders import peer_report
from hivemind.utils import get_dht_time
from keys import Keyring
from processes import RUN_ID, STOP_GRACE, Coordinator, fetch, free_port, listed, peer, peer_id, wait_for

from vitpeer.peer.core.runtime.processes import stop_all
from vitpeer.peer.core.swarm.records import REPORT_TTL, metrics_key

pytestmark = pytest.mark.slow

MADE_UP = 100
HOSTILE = (
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">"
    "<script>document.body.setAttribute('data-pwned','script')</script>\x1b]0;pwned\x07"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Scenario:
    coordinator: Coordinator
    tmp: Path
    real: dict[str, dict[str, Any]]  # the two training peers' rows of /status, by claimed peer id


def store_made_up_peers(initial_peers: list[str], keyring: Keyring) -> None:
    """Signed records of peers that train nothing (step 0, no loss), one per key of ``keyring``; the first one's
    hardware is hostile."""
    node = hivemind.DHT(
        initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[keyring], start=True
    )
    try:
        now, stored = get_dht_time(), []
        for index, key in enumerate(keyring.keys):
            report = peer_report(
                peer_id=f"made-up-peer-{index:03d}",
                step=0,
                loss=None,
                window_samples=0,
                hardware=HOSTILE if index == 0 else f"cpu: made up {index}",
                time=now,
                algorithm="gradient",
            )
            record = {"subkey": key, "value": report.dict(), "expiration_time": now + REPORT_TTL}
            stored.append(node.store(metrics_key(RUN_ID), **record, return_future=True))  # one by one took 10 s
        for future in stored:
            future.result(timeout=60)
    finally:
        node.shutdown()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("page")
    state_dir = tmp / "coordinator"
    coordinator = Coordinator(state_dir, free_port(), tmp / "coordinator.log", checkpoint_every=4)
    peers: list[subprocess.Popen] = []
    making_keys = ThreadPoolExecutor(1)
    keyring = making_keys.submit(Keyring, MADE_UP)  # 100 RSA keys took 4 s: made while the swarm starts
    try:
        coordinator.start()
        peers = [peer(1, tmp, coordinator), peer(2, tmp, coordinator)]
        wait_for("both peers' ids", lambda: all(peer_id(tmp, i) for i in (1, 2)), 90)
        ids = [peer_id(tmp, i) for i in (1, 2)]
        wait_for("both peers in /status", lambda: set(ids) <= set(listed(coordinator.status())), 90)
        wait_for("5 swarm steps in the history", lambda: len(history(coordinator.url)["points"]) >= 5, 120, every=1)
        wait_for("the best model's export", lambda: (state_dir / "best" / "model.safetensors").is_file(), 120, every=1)
        store_made_up_peers((state_dir / "initial_peers.txt").read_text().split(), keyring.result(timeout=120))
        status = wait_for(
            "the made-up peers in /status", lambda: (s := coordinator.status())["alive_peers"] >= MADE_UP + 2 and s, 30
        )
        yield Scenario(coordinator, tmp, {row["peer_id"]: row for row in status["peers"] if row["peer_id"] in ids})
    finally:
        making_keys.shutdown(cancel_futures=True)
        stop_all([*peers, *filter(None, [coordinator.process])], grace=STOP_GRACE)


def history(url: str) -> dict[str, Any]:
    return json.loads(fetch(f"{url}/history.json"))


def rendered(url: str, tmp: Path, screenshot: Path | None = None) -> str:
    """The page's DOM after 8 s of the browser's virtual time (two polls at least); a screenshot when asked."""
    if CHROMIUM is None:
        pytest.skip("chromium not found: apt-get install chromium (make test-tools) to test the page in a browser")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp}"]
    command += ["--virtual-time-budget=8000", "--window-size=1280,900"]
    if screenshot is not None:
        subprocess.run([*command, f"--screenshot={screenshot}", url], capture_output=True, timeout=60, check=True)
    result = subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


@pytest.mark.browser
@pytest.mark.timeout(400)
def test_page_lists_the_peers_and_draws_the_loss_in_a_real_browser(scenario: Scenario):
    shot = scenario.tmp / "page.png"
    dom = rendered(f"{scenario.coordinator.url}/", scenario.tmp / "chromium", screenshot=shot)
    assert shot.is_file() and shot.stat().st_size > 10_000
    rows = re.findall(r'<tr data-signer="([^"]+)"', dom)
    assert len(rows) >= MADE_UP + 2
    for row in scenario.real.values():
        assert row["signer"] in rows
    chart = re.search(r'<svg id="loss-chart"[^>]*data-points="(\d+)".*?<polyline[^>]*points="([^"]+)"', dom, re.S)
    assert chart is not None, dom[:3000]
    assert int(chart.group(1)) >= 5 and len(chart.group(2).split()) == int(chart.group(1))
    status = scenario.coordinator.status()
    assert f'<span id="run-id" class="mono">{RUN_ID}</span>' in dom
    assert f'<span id="max-steps" class="muted">{status["max_steps"]}</span>' in dom
    assert f"vitpeer join --coordinator {scenario.coordinator.url}</code>" in dom
    assert 'href="/best/model.safetensors"' in dom and re.search(r'<p id="downloads"(?! hidden)[^>]*>', dom)


@pytest.mark.browser
@pytest.mark.timeout(400)
def test_a_peers_hardware_string_is_shown_as_text_and_runs_nothing(scenario: Scenario):
    dom = rendered(f"{scenario.coordinator.url}/", scenario.tmp / "chromium-xss")
    assert "&lt;script&gt;document.body.setAttribute('data-pwned','script')&lt;/script&gt;" in dom
    assert "&lt;img src=x onerror=" in dom
    assert not re.search(r"<body[^>]*data-pwned", dom)  # neither the script nor the onerror handler ran
    assert "<script>document.body" not in dom and '<img src="x"' not in dom


def timed_get(url: str) -> tuple[float, bytes]:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=10) as response:
        return time.monotonic() - started, response.read()


@pytest.mark.timeout(400)
def test_page_and_its_data_answer_within_a_second_with_a_hundred_peers(scenario: Scenario):
    url = scenario.coordinator.url
    assert scenario.coordinator.status()["alive_peers"] >= MADE_UP + 2
    for path in ("/", "/page.js", "/page.css", "/status", "/history.json", "/best/config.json"):
        seconds, body = timed_get(url + path)
        assert seconds < 1.0, f"{path} took {seconds:.2f} s"
        assert body
    best = scenario.coordinator.state_dir / "best"
    assert timed_get(f"{url}/best/model.safetensors")[1] == (best / "model.safetensors").read_bytes()
    for path in ("/best/all_results.json", "/best/../config.yaml", "/best/%2e%2e/config.yaml", "/metrics.jsonl"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + path, timeout=10)
        assert refused.value.code == 404, path


@pytest.mark.timeout(400)
def test_vitpeer_status_prints_the_swarm_as_a_table(scenario: Scenario):
    result = subprocess.run(
        [sys.executable, "-m", "vitpeer.peer.cli", "status", scenario.coordinator.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"run {RUN_ID} (gradient, config ")
    assert re.match(r"swarm step \d+ / \d+ \| \d+ peers \| [\d.]+ samples/s \| loss [\d.]+$", lines[1]), lines[1]
    assert "best at step" in lines[2]
    for claimed in scenario.real:
        assert f"{claimed[:6]}…{claimed[-6:]}" in out
    assert "\x1b" not in out and "\x07" not in out  # the hostile escape sequence is shown as ?
    assert sum(1 for line in lines if "made-u" in line) == MADE_UP


def test_vitpeer_status_imports_neither_torch_nor_hivemind():
    check = "import sys\nfrom vitpeer.peer.commands import status\n"
    check += "print(sorted({'torch', 'hivemind', 'timm', 'pytorch_lightning'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
