"""A host's devices as one peer: a 2-rank DDP peer, then a 2-rank FSDP peer (gloo, CPU), each trains in a swarm with
a single-device peer."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from processes import spawn, wait_for

from vitpeer.peer.core.runtime.processes import stop_all

pytestmark = pytest.mark.slow

STEPS, TARGET, BATCH = 12, 256, 32


def join(output_dir: Path, *args: str):
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [
        "join",
        "--config",
        "digits_tiny_gradient",  # several local ranks are the gradient algorithm's (diloco refuses them)
        "--output-dir",
        str(output_dir),
        "--run-id",
        "local-ranks",
        "--host-maddr",
        "/ip4/127.0.0.1/tcp/0",
    ]
    command += ["--max-steps", str(STEPS), "--target-batch-size", str(TARGET), "--batch-size", str(BATCH), *args]
    # state rounds every 5 swarm steps: the last step (12) must still end with one, or the peers end apart
    command += ["--average-state-every", "5"]
    return spawn(command, output_dir / "log.txt")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("local", ["ddp", "fsdp"])
def test_multi_rank_peer_counts_once_contributes_all_its_ranks_samples_and_keeps_ranks_identical(
    tmp_path: Path, local: str
):
    # the multi-rank peer starts the swarm, the single peer joins through the address it printed; both begin together
    processes = [join(tmp_path / "multi", "--local-strategy", local, "--devices", "2", "--fsdp-min-params", "100000")]
    try:
        hint = wait_for(
            "the multi-rank peer's address",
            lambda: re.search(r"--initial-peers (\S+)", (tmp_path / "multi" / "log.txt").read_text()),
            120,
        )
        processes.append(join(tmp_path / "single", "--initial-peers", hint[1]))
        codes = [process.wait(timeout=240) for process in processes]
    finally:
        stop_all(processes)
    logs = {name: (tmp_path / name / "log.txt").read_text() for name in ("multi", "single")}
    assert codes == [0, 0], {name: log[-3000:] for name, log in logs.items()}
    results = {name: json.loads((tmp_path / name / "all_results.json").read_text()) for name in ("multi", "single")}
    assert results["single"]["swarm_epoch"] == results["multi"]["swarm_epoch"] == STEPS
    assert results["multi"]["local_ranks"] == 2
    for name in ("multi", "single"):  # a peer's run files are a train run's: results keys, history, config
        assert {"train_loss", "train_runtime", "train_samples_per_second", "eval_loss", "eval_accuracy", "epoch"} <= (
            results[name].keys()
        )
        steps = json.loads((tmp_path / name / "history" / "history.json").read_text())["steps"]
        # every step has its peer count; the last one's depends on whether the other peer had already said goodbye
        # when this one logged it (CI, 2026-12-07: 1), so the pair is checked over the run: two peers, never three
        assert steps[-1]["step"] == STEPS and max(step["swarm/peers"] for step in steps) == 2
        assert json.loads((tmp_path / name / "config.json").read_text())["swarm"]["run_id"] == "local-ranks"

    # the swarm counts the 2-rank host as one peer
    for name in ("multi", "single"):
        rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
        seen = {float(row["swarm/peers"]) for row in rows if row.get("swarm/peers")}
        assert max(seen) == 2, (name, seen)

    # the multi-rank peer contributes both ranks' samples each local step; the peers' samples add up to the target
    multi = results["multi"]
    assert multi["samples_contributed"] == multi["local_steps"] * 2 * BATCH
    assert results["single"]["samples_contributed"] + multi["samples_contributed"] >= STEPS * TARGET

    # both local ranks hold the same parameters, bit for bit, and they are the other peer's: the last checkpoint is
    # written after the last swarm step's state-averaging round is applied (peers whose Adam moments differ since
    # the swarm formed step apart by up to one learning rate until that round lands)
    digests = dict(re.findall(r"local rank (\d) of 2: parameters sha256 (\w+)", logs["multi"]))
    assert digests.keys() == {"0", "1"} and digests["0"] == digests["1"], digests
    states = [
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False) for name in ("multi", "single")
    ]
    assert states[0]["swarm_epoch"] == states[1]["swarm_epoch"] == STEPS
    differing = {
        name: float((tensor - states[1]["state_dict"][name]).abs().max())
        for name, tensor in states[0]["state_dict"].items()
        if not torch.allclose(tensor, states[1]["state_dict"][name], rtol=0, atol=1e-5)
    }
    assert not differing, differing
