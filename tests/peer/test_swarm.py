"""Two real peers on 127.0.0.1, started as a volunteer would start them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peer.demo import run_demo, stop_all

pytestmark = pytest.mark.slow


def peer(output_dir: Path, *args: str) -> subprocess.Popen:
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "peer.cli", "join", "--output-dir", str(output_dir), "--run-id", "two-terminals"]
    command += ["--host-maddr", "/ip4/127.0.0.1/tcp/0", "--max-steps", "20", *args]
    with (output_dir / "log.txt").open("w") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )


@pytest.mark.timeout(300)
def test_second_peer_joins_with_the_first_peers_printed_address(tmp_path: Path):
    first = peer(tmp_path / "a", "--target-batch-size", "512")
    processes = [first]
    try:
        address_file = tmp_path / "a" / "initial_peers.txt"
        deadline = time.monotonic() + 120
        while not address_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        printed = (tmp_path / "a" / "log.txt").read_text()
        line = next(line for line in printed.splitlines() if "others join with:" in line)
        hint = line.split("others join with: ", 1)[1].split()
        initial_peers = hint[hint.index("--initial-peers") + 1 :]
        processes.append(peer(tmp_path / "b", "--target-batch-size", "512", "--initial-peers", *initial_peers))
        codes = [process.wait(timeout=240) for process in processes]
    finally:
        stop_all(processes)
    assert codes == [0, 0], [(tmp_path / name / "log.txt").read_text()[-3000:] for name in "ab"]
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in "ab"]
    assert results[0]["swarm_epoch"] == results[1]["swarm_epoch"] == 20
    for name in "ab":
        rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
        assert any(row.get("swarm/peers") and float(row["swarm/peers"]) == 2 for row in rows), f"{name} never saw 2"


DEMO_STEPS = 150
"""The demo's own schedule compressed to half its 300 swarm steps (warm-up + cosine over 150), to keep the suite in
budget. Measured on this 2-core machine: 150 steps reached 0.944 test accuracy in 277 s; 300 steps 0.955 in 515-600 s.
"""


@pytest.mark.timeout(600)
def test_two_peer_demo_reaches_90_percent_with_identical_parameters(tmp_path: Path):
    accuracy = run_demo(2, "digits_tiny", tmp_path, max_steps=DEMO_STEPS)
    assert accuracy is not None and accuracy >= 0.90
    states = [torch.load(tmp_path / f"peer-{i}" / "checkpoints" / "last.ckpt", weights_only=False) for i in (1, 2)]
    assert states[0]["swarm_epoch"] == states[1]["swarm_epoch"] == DEMO_STEPS
    for name, tensor in states[0]["state_dict"].items():
        torch.testing.assert_close(tensor, states[1]["state_dict"][name], rtol=0, atol=1e-5, msg=name)
