"""A host's devices as one peer: a 2-rank DDP peer, then a 2-rank FSDP peer (gloo, CPU), each trains in a swarm with
a single-device peer."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import hivemind
import pytest
import torch
from processes import spawn

from peer.demo import stop_all

pytestmark = pytest.mark.slow

STEPS, TARGET, BATCH = 30, 512, 32  # ~25 s of training: the 2-rank peer starts ~10 s after the other


def join(output_dir: Path, *args: str):
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [
        "join",
        "--output-dir",
        str(output_dir),
        "--run-id",
        "local-ranks",
        "--host-maddr",
        "/ip4/127.0.0.1/tcp/0",
    ]
    command += ["--max-steps", str(STEPS), "--target-batch-size", str(TARGET), "--batch-size", str(BATCH), *args]
    return spawn(command, output_dir / "log.txt")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("local", ["ddp", "fsdp"])
def test_multi_rank_peer_counts_once_contributes_all_its_ranks_samples_and_keeps_ranks_identical(
    tmp_path: Path, local: str
):
    bootstrap = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])  # where both peers meet, as in the demo
    meet = ["--initial-peers", ",".join(str(addr) for addr in bootstrap.get_visible_maddrs())]
    processes = [
        join(tmp_path / "single", *meet),
        join(tmp_path / "ddp", "--local-strategy", local, "--devices", "2", "--fsdp-min-params", "100000", *meet),
    ]
    try:
        codes = [process.wait(timeout=240) for process in processes]
    finally:
        stop_all(processes)
        bootstrap.shutdown()
    logs = {name: (tmp_path / name / "log.txt").read_text() for name in ("single", "ddp")}
    assert codes == [0, 0], {name: log[-3000:] for name, log in logs.items()}
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("single", "ddp")}
    assert results["single"]["swarm_epoch"] == results["ddp"]["swarm_epoch"] == STEPS
    assert results["ddp"]["local_ranks"] == 2

    # the swarm counts the 2-rank host as one peer
    for name in ("single", "ddp"):
        rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
        seen = {float(row["swarm/peers"]) for row in rows if row.get("swarm/peers")}
        assert max(seen) == 2, (name, seen)

    # the DDP peer contributes both ranks' samples each local step, and the two peers' samples add up to the target
    ddp = results["ddp"]
    assert ddp["samples_contributed"] == ddp["local_steps"] * 2 * BATCH
    assert results["single"]["samples_contributed"] + ddp["samples_contributed"] >= STEPS * TARGET

    # both local ranks hold the same parameters, bit for bit, and they are the other peer's
    digests = dict(re.findall(r"local rank (\d) of 2: parameters sha256 (\w+)", logs["ddp"]))
    assert digests.keys() == {"0", "1"} and digests["0"] == digests["1"], digests
    states = [
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False) for name in ("single", "ddp")
    ]
    assert states[0]["swarm_epoch"] == states[1]["swarm_epoch"] == STEPS
    for name, tensor in states[0]["state_dict"].items():
        torch.testing.assert_close(tensor, states[1]["state_dict"][name], rtol=0, atol=1e-5, msg=name)
