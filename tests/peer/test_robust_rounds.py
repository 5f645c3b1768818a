"""A hostile volunteer in a diloco swarm of three on 127.0.0.1: the same ``vitpeer join`` with one change
(``hostile``, ``HOSTILE_ROUNDS=scale``): every pseudo-gradient it sends to a round is 7 times its own, declared with
a weight of a million samples. Under plain mean every peer takes the liar's oversized step each round (it passes the
check of what a peer receives: 7 times an honest step is within its bound, and it points the right way), and in a run
here all three ended at 0.100 test accuracy, chance (15 swarm steps of 2048, 2026-12-07). The default rule for
diloco, ``centered_clip``, clips the liar's part to the honest ones' length: the honest peers must still learn."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from processes import spawn, wait_for

from vitpeer.peer.core.runtime.processes import stop_all

pytestmark = pytest.mark.slow

FLAGS = ["--config", "digits_tiny_diloco", "--max-steps", "15", "--target-batch-size", "2048"]
FLAGS += ["--host-maddr", "/ip4/127.0.0.1/tcp/0", "--matchmaking-time", "1.0", "--averaging-timeout", "10"]
GROUP = re.compile(r"swarm step \d+/\d+ \| peers 3")


@pytest.mark.timeout(300)
def test_one_volunteer_sending_oversized_steps_does_not_stop_the_honest_peers_learning(tmp_path: Path):
    processes: dict[str, subprocess.Popen] = {}

    def start(name: str, *extra: str, **env: str) -> None:
        (tmp_path / name).mkdir()
        module = "hostile" if env else "vitpeer.peer.cli"
        command = ["join", *FLAGS, "--output-dir", str(tmp_path / name), *extra]
        processes[name] = spawn(command, tmp_path / name / "log.txt", module=module, **env)

    try:
        start("a")
        wait_for("peer a's address", lambda: (tmp_path / "a" / "initial_peers.txt").is_file(), 60)
        join = ["--initial-peers", (tmp_path / "a" / "initial_peers.txt").read_text().split()[0]]
        start("b", *join)
        start("liar", *join, HOSTILE_ROUNDS="scale")
        for name, process in processes.items():
            code = process.wait(timeout=240)
            assert code == 0, f"{name} exited {code}:\n" + (tmp_path / name / "log.txt").read_text()[-3000:]
    finally:
        stop_all(list(processes.values()))
    logs = {name: (tmp_path / name / "log.txt").read_text() for name in processes}
    assert GROUP.search(logs["liar"]), "the liar never counted the swarm of three"
    accuracy = {}
    for name in ("a", "b"):
        results = json.loads((tmp_path / name / "all_results.json").read_text())
        assert results["swarm_epoch"] == 15, results
        accuracy[name] = results["test_accuracy"]
    # With this liar: 0.881 and 0.874 for the better honest peer in runs here; 0.930 with three honest peers; 0.100
    # for all under plain mean. A peer whose last round fails ends alone with its own last progress, whatever the
    # rule: seen once in CI (0.733 beside 0.874: its round of step 14 failed, and the others had left before it could
    # sync). The bar for every honest peer tells learning from the collapse; the better one must have learned well.
    assert max(accuracy.values()) >= 0.8 and min(accuracy.values()) >= 0.6, (accuracy, logs["b"][-2000:])
