"""On a GPU host: a peer training there shows its GPU busy in its own /metrics (skipped without a GPU)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from processes import METRICS_AT, fetch, printed, spawn, wait_for

from vitpeer.peer.core.runtime.processes import stop_all

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def gpu_readings(url: str) -> list[tuple[str, float]]:
    return [
        (gpu, float(value))
        for gpu, value in re.findall(r'vitpeer_gpu_utilization_ratio\{gpu="(\d+)".*\} (\S+)', fetch(url))
    ]


@pytest.mark.timeout(300)
def test_gpu_utilization_rises_while_a_peer_trains(tmp_path: Path):
    out = tmp_path / "peer"
    out.mkdir()
    command = ["join", "--output-dir", str(out), "--host-maddr", "/ip4/127.0.0.1/tcp/0", "--accelerator", "gpu"]
    command += ["--max-steps", "100000", "--batch-size", "256", "--target-batch-size", "100000", "--metrics-port", "0"]
    process: subprocess.Popen = spawn(command, out / "log.txt")
    try:
        url = wait_for("the metrics URL", lambda: printed(out / "log.txt", METRICS_AT), 120)
        wait_for("training to start", lambda: "swarm step" in (out / "log.txt").read_text() or None, 120)
        readings = []
        for _ in range(20):  # NVML averages over its own sample period: look a few times
            readings += gpu_readings(url)
            if any(value > 0 for _, value in readings):
                break
            time.sleep(1)
        print("vitpeer_gpu_utilization_ratio readings:", readings)
        assert readings and max(value for _, value in readings) > 0, readings
    finally:
        stop_all([process])
