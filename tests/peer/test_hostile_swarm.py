"""A hostile swarm, played once with real processes on 127.0.0.1 and judged by several tests.

A coordinator and three peers train digits_tiny together:

- peer ``steady`` is an ordinary volunteer;
- peer ``poisoned`` turns every third batch's loss into NaN (``tests/hostile.py``), as a diverging peer would;
- peer ``churned`` is SIGKILLed in the middle of an averaging round, ``KILLS`` times, and restarted each time in
  the same directory: a late joiner at whatever swarm step the others have reached;
- once, a peer built with another architecture (depth 3 instead of 4) tries to join under the same run id.

Every process is stopped in the fixture's ``finally`` block, even when the scenario fails halfway.
"""

from __future__ import annotations

import json
import re
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile import ROUND_MARK
from processes import CONFIG, STOP_GRACE, Coordinator, free_port, spawn, wait_for

from vitpeer.peer.core.config import load_config
from vitpeer.peer.core.runtime.processes import stop_all

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the first test waits for the whole scenario

KILLS = 3
MAX_STEPS = 50
MATCHMAKING_TIME = 2.0  # digits_tiny's
AVERAGING_TIMEOUT = 5.0
STALL_BOUND = MATCHMAKING_TIME + AVERAGING_TIMEOUT
LATE_JOIN_BOUND = 30.0
STEP = re.compile(r"^(\d\d:\d\d:\d\d) vitpeer swarm step (\d+)/\d+ \| peers (\d+) \| loss (\S+)", re.M)
LOADED = re.compile(r"^(\d\d:\d\d:\d\d) vitpeer loaded the swarm's state at step (\d+) in ([\d.]+) s", re.M)
JOINED = re.compile(r"^(\d\d:\d\d:\d\d) vitpeer peer \w+ joined run", re.M)


def wall(clock: str) -> float:
    """A log line's HH:MM:SS (local time, today) as a Unix time; the line was written within the next second."""
    parsed = datetime.combine(datetime.now().date(), datetime.strptime(clock, "%H:%M:%S").time())
    return parsed.timestamp()


def text(log: Path, since: int = 0) -> str:
    return log.read_text()[since:] if log.is_file() else ""


def steps(log: Path, since: int = 0) -> list[tuple[float, int, int, str]]:
    """(wall time, swarm step, peers, loss) of every swarm-step line after byte ``since``."""
    return [(wall(t), int(step), int(peers), loss) for t, step, peers, loss in STEP.findall(text(log, since))]


class Swarm:
    """The processes of the scenario and where they write."""

    def __init__(self, root: Path):
        self.root = root
        self.coordinator = Coordinator(root / "coordinator", free_port(), root / "coordinator.log")
        self.processes: dict[str, Any] = {}

    def out(self, name: str) -> Path:
        return self.root / name

    def log(self, name: str) -> Path:
        return self.out(name) / "log.txt"

    def join(self, name: str, *extra: str, module: str = "vitpeer.peer.cli", **env: str):
        self.out(name).mkdir(exist_ok=True)
        command = ["join", "--coordinator", self.coordinator.url, "--output-dir", str(self.out(name))]
        command += ["--host-maddr", "/ip4/127.0.0.1/tcp/0", "--max-steps", str(MAX_STEPS)]
        command += ["--averaging-timeout", str(AVERAGING_TIMEOUT), *extra]
        self.processes[name] = spawn(command, self.log(name), module=module, **env)
        return self.processes[name]

    def all(self) -> list:
        return [self.coordinator.process, *self.processes.values()]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict[str, Any]:
    swarm = Swarm(tmp_path_factory.mktemp("hostile"))
    record: dict[str, Any] = {"kills": [], "swarm": swarm}
    try:
        swarm.coordinator.start()
        swarm.join("steady")
        swarm.join("poisoned", module="hostile", HOSTILE_NAN_EVERY="3")
        churned = swarm.join("churned", module="hostile", HOSTILE_SAY_ROUNDS="1")
        wait_for("three peers training together", lambda: any(p == 3 for _, _, p, _ in steps(swarm.log("steady"))), 180)

        for kill in range(KILLS):
            since = len(text(swarm.log("churned")))  # this run of the churned peer writes from here on
            if kill > 0:
                churned = swarm.join("churned", module="hostile", HOSTILE_SAY_ROUNDS="1")
                record.setdefault("late_joins", []).append(late_join(swarm, since, started=time.time()))
            if kill == 2:
                mismatched = start_mismatched_peer(swarm)  # judged after the churn: its start-up takes a while
            record["kills"].append(kill_in_a_round(swarm, churned, since))

        churned = swarm.join("churned", module="hostile", HOSTILE_SAY_ROUNDS="1")  # the last restart trains to the end
        record["mismatch"] = judge_mismatched_peer(swarm, mismatched)
        for name in ("steady", "poisoned", "churned"):
            code = swarm.processes[name].wait(timeout=600)
            assert code == 0, f"{name} exited with {code}:\n{text(swarm.log(name))[-3000:]}"
        for name in ("steady", "poisoned", "churned"):
            record[name] = json.loads((swarm.out(name) / "all_results.json").read_text())
        yield record
    finally:
        stop_all(swarm.all(), grace=STOP_GRACE)


def late_join(swarm: Swarm, since: int, started: float) -> dict[str, Any]:
    """The restarted peer: the swarm step when it started, the step whose state it loaded, and how long it took
    from its process start and from the moment it was in the swarm (DHT up, model built, the join line printed)."""
    swarm_step = max([step for _, step, _, _ in steps(swarm.log("steady"))], default=0)
    log = swarm.log("churned")
    found = wait_for("the restarted peer's state download", lambda: LOADED.search(text(log, since)), 120)
    joined = JOINED.search(text(log, since))
    return {
        "swarm_step_at_start": swarm_step,
        "loaded_step": int(found[2]),
        "from_process_start_s": wall(found[1]) + 1 - started,
        "from_joining_s": wall(found[1]) + 1 - wall(joined[1]),
        "download_s": float(found[3]),
    }


def kill_in_a_round(swarm: Swarm, churned, since: int) -> dict[str, Any]:
    """SIGKILL the churned peer once it is in an averaging round; how long until each survivor's next swarm step."""
    wait_for("the churned peer in an averaging round", lambda: ROUND_MARK in text(swarm.log("churned"), since), 120)
    survivors = {name: len(text(swarm.log(name))) for name in ("steady", "poisoned")}
    killed_at = time.time()
    churned.send_signal(signal.SIGKILL)
    churned.wait(timeout=30)
    after = {}
    for name, offset in survivors.items():
        log = swarm.log(name)
        first = wait_for(f"{name}'s next swarm step", lambda log=log, offset=offset: steps(log, offset), 120)[0]
        after[name] = first[0] + 1 - killed_at  # an upper bound: the line was written within its second
    return {"killed_at": killed_at, "next_step_within_s": after}


def start_mismatched_peer(swarm: Swarm):
    """A peer whose network has 3 blocks instead of 4, under the same run id: it must stop before averaging."""
    config = swarm.root / "depth3.yaml"
    assert load_config(CONFIG).model.kwargs["depth"] == 4
    config.write_text(f"base: {CONFIG}\nmodel:\n  kwargs: {{depth: 3}}\n")  # a base's mappings merge key by key
    out = swarm.out("mismatched")
    out.mkdir()
    initial = (swarm.coordinator.state_dir / "initial_peers.txt").read_text().split()
    command = ["join", "--config", str(config), "--initial-peers", *initial[:1], "--output-dir", str(out)]
    swarm.processes["mismatched"] = spawn([*command, "--host-maddr", "/ip4/127.0.0.1/tcp/0"], out / "log.txt")
    return swarm.processes["mismatched"]


def judge_mismatched_peer(swarm: Swarm, process) -> dict[str, Any]:
    """Its exit code and words, and whether the others went on training after it left."""
    code = process.wait(timeout=120)
    steady_then = len(text(swarm.log("steady")))
    wait_for("the steady peer's next step", lambda: steps(swarm.log("steady"), steady_then), 60)
    log = text(swarm.out("mismatched") / "log.txt")
    return {"code": code, "log": log, "status": swarm.coordinator.status()}


def parameters(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_churn_the_swarm_keeps_advancing_and_no_survivor_stalls(scenario: dict[str, Any]):
    assert len(scenario["kills"]) == KILLS
    longest = max(max(kill["next_step_within_s"].values()) for kill in scenario["kills"])
    print(f"\nlongest stall after a kill: {longest:.1f} s (bound {STALL_BOUND:.1f} s); kills: {scenario['kills']}")
    assert longest <= STALL_BOUND, scenario["kills"]
    for name in ("steady", "poisoned", "churned"):
        assert scenario[name]["swarm_epoch"] == MAX_STEPS


def test_survivors_end_with_finite_identical_parameters(scenario: dict[str, Any]):
    """The two peers that lived through every kill end with the same parameters, to float rounding (the demo's
    tolerance). Not bit for bit: a round the churned peer died in leaves each survivor stepping with its own
    gradients, and later state rounds bring them back together to rounding (one CI run ended 1.6e-6 apart). The
    churned peer's last run ends finite (it may finish its last step alone: the others leave once they reach
    ``max_steps``)."""
    swarm: Swarm = scenario["swarm"]
    steady, poisoned, churned = (parameters(swarm.out(name)) for name in ("steady", "poisoned", "churned"))
    apart = max((tensor - poisoned[key]).abs().max().item() for key, tensor in steady.items())
    print(f"\nsurvivors' largest parameter difference: {apart:.2e}")
    for key, tensor in steady.items():
        assert torch.isfinite(tensor).all() and torch.isfinite(churned[key]).all(), key
        torch.testing.assert_close(tensor, poisoned[key], rtol=0, atol=1e-5, msg=key)
    assert scenario["steady"]["test_accuracy"] > 0.4, scenario["steady"]  # learned, under all that: chance is 0.1


def test_late_joiner_holds_the_swarm_state_within_30_s(scenario: dict[str, Any]):
    joins = scenario["late_joins"]
    assert len(joins) == KILLS - 1, joins
    for join in joins:  # it holds the state of the swarm step it started at, or a newer one
        assert join["loaded_step"] >= join["swarm_step_at_start"] > 0, joins
    slowest = max(join["from_joining_s"] for join in joins)
    print(f"\nslowest late join: {slowest:.1f} s from joining the swarm; {joins}")
    assert slowest <= LATE_JOIN_BOUND, joins


def test_poisoned_batches_never_reach_the_swarm(scenario: dict[str, Any]):
    """Each NaN batch the poisoned peer made (every third it finished) was kept out of the swarm: by the poison
    guard, or, when hivemind found the peer behind the swarm at that step, dropped unsent with the state download
    (one CI run: 107 guarded + some dropped of 113 NaN batches; the guard alone cannot see those)."""
    poisoned, swarm = scenario["poisoned"], scenario["swarm"]
    made = poisoned["local_steps"] // 3
    guarded, dropped = poisoned["batches_skipped_nonfinite"], poisoned["batches_dropped_behind"]
    assert made > 0 and guarded <= made and guarded + dropped >= made, poisoned
    assert guarded >= made // 2, poisoned  # the guard, not catching up, is what stops them
    assert "non-finite gradients (NaN or Inf) in a local batch" in text(swarm.log("poisoned"))
    for name in ("steady", "churned"):
        assert scenario[name]["batches_skipped_nonfinite"] == 0
        losses = [float(loss) for *_, loss in steps(swarm.log(name))]
        assert losses and all(loss == loss and loss < 10 for loss in losses), (name, losses)  # no NaN spread


def test_mismatched_peer_is_refused_and_disturbs_no_one(scenario: dict[str, Any]):
    mismatch = scenario["mismatch"]
    assert mismatch["code"] == 2, mismatch["log"][-3000:]
    ours, theirs = "vit_tiny_patch16_224 (454,954 parameters) at 16 px", "vit_tiny_patch16_224 (343,114 parameters)"
    assert f"trains {ours}" in mismatch["log"], mismatch["log"][-3000:]
    assert f"but this peer has {theirs}" in mismatch["log"]
    assert "Traceback" not in mismatch["log"]
    assert len(mismatch["status"]["peers"]) <= 3  # it never reported as a peer
    assert "swarm step" not in mismatch["log"]
