"""``swarm.algorithm = diloco`` in real peers on 127.0.0.1 (``vitpeer join --config digits_tiny_diloco``).

One scenario, read by the tests below: peers A and B train the run from the start; a peer with another outer
learning rate tries to join and is refused; a victim joins and is SIGKILLed right after a round was handed off; a
late joiner starts once the swarm is at step ``LATE_AT``. A, B and the late joiner train to ``STEPS``.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from processes import spawn, wait_for

pytestmark = pytest.mark.slow

STEPS = 24
TARGET = 512
LATE_AT = 8
FLAGS = ["--config", "digits_tiny_diloco", "--max-steps", str(STEPS), "--target-batch-size", str(TARGET)]
FLAGS += ["--batch-size", "32"]
FLAGS += ["--host-maddr", "/ip4/127.0.0.1/tcp/0", "--matchmaking-time", "1.0", "--averaging-timeout", "10"]
STEP_LINE = re.compile(r"swarm step (\d+)/\d+ \| peers (\d+) \| loss ([\d.na]+)")


def steps(log: Path) -> list[tuple[int, int, float]]:
    text = log.read_text() if log.is_file() else ""
    return [(int(step), int(peers), float(loss)) for step, peers, loss in STEP_LINE.findall(text)]


def last_step(log: Path) -> int:
    found = steps(log)
    return found[-1][0] if found else -1


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("diloco")
    processes: dict[str, subprocess.Popen] = {}

    def start(name: str, *extra: str) -> Path:
        out = root / name
        out.mkdir()
        processes[name] = spawn(["join", *FLAGS, "--output-dir", str(out), *extra], out / "log.txt")
        return out / "log.txt"

    try:
        log_a = start("a")
        address = wait_for("peer a's address", lambda: (root / "a" / "initial_peers.txt").is_file(), 60)
        assert address
        peers = (root / "a" / "initial_peers.txt").read_text().split()
        join = ["--initial-peers", peers[0]]
        start("b", *join)
        mismatch_log = start("mismatch", *join, "--outer-lr", "0.5")
        victim_log = start("victim", *join)
        mismatch_code = processes["mismatch"].wait(timeout=120)
        # the victim dies right after a round began (its part handed off, the others waiting for it)
        wait_for("the victim to train along", lambda: last_step(victim_log) >= 3, 180)
        killed_after = last_step(log_a)
        wait_for("a new round", lambda: last_step(log_a) > killed_after, 60, every=0.05)
        processes["victim"].send_signal(signal.SIGKILL)
        killed_at = last_step(log_a)
        wait_for(f"the swarm at step {LATE_AT}", lambda: last_step(log_a) >= LATE_AT, 240)
        late_log = start("late", *join)
        for name in ("a", "b", "late"):
            code = processes[name].wait(timeout=420)
            assert code == 0, (root / name / "log.txt").read_text()[-3000:]
        return {
            "root": root,
            "mismatch": {"code": mismatch_code, "log": mismatch_log.read_text()},
            "killed_at": killed_at,
            "late_log": late_log.read_text(),
            "late_started_at": LATE_AT,
        }
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def results(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / name / "all_results.json").read_text())


def test_diloco_peers_learn_together(scenario):
    root = scenario["root"]
    first, second = results(root, "a"), results(root, "b")
    assert first["swarm_epoch"] == second["swarm_epoch"] == STEPS
    for found in (first, second):  # 12,288 samples: 0.82 and 0.86 in two runs here (0.26 and 0.50 at lr 0.006)
        assert found["test_accuracy"] >= 0.6, found
    losses = [loss for _, _, loss in steps(root / "a" / "log.txt")]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    # Equal final parameters are asserted where two peers end alone together: the demo test (test_swarm.py). Under
    # this scenario's churn they are not guaranteed: a round that failed for one peer but not another leaves their
    # shared states apart until the next exact sync, and the final sync may pair only two of three peers ending at
    # once. Seen in one of eight runs here: test accuracy 0.470 against 0.567 (README, known limits).


def test_rounds_averaged_with_the_others(scenario):
    """Some swarm steps were trained by more than one peer (the round averaged with them)."""
    counted = [peers for _, peers, _ in steps(scenario["root"] / "a" / "log.txt")]
    assert max(counted) >= 2, counted


def test_a_peer_killed_in_a_round_does_not_stop_the_others(scenario):
    """The victim was killed right after a round was handed off; A and B still ended at ``STEPS`` (asserted by the
    fixture: exit 0) and went on within the round's bound after the kill."""
    log = scenario["root"] / "a" / "log.txt"
    after = [step for step, _, _ in steps(log) if step > scenario["killed_at"]]
    assert after and after[-1] == STEPS


def test_a_late_joiner_enters_with_the_shared_state(scenario):
    found = re.search(r"loaded the swarm's state at step (\d+)", scenario["late_log"])
    assert found, scenario["late_log"][-3000:]
    assert int(found.group(1)) >= scenario["late_started_at"]
    late = results(scenario["root"], "late")
    assert late["swarm_epoch"] == STEPS and late["test_accuracy"] >= 0.6, late


def test_a_peer_with_other_run_settings_is_refused_naming_the_field(scenario):
    mismatch = scenario["mismatch"]
    assert mismatch["code"] == 2, mismatch["log"][-3000:]
    assert "swarm.outer_lr = 0.5 (the run: 1.0)" in mismatch["log"], mismatch["log"][-3000:]
    assert "Traceback" not in mismatch["log"]
    assert "swarm step" not in mismatch["log"]
