"""A ``--client-mode`` peer (no incoming connections, as a volunteer behind NAT) trains with a public peer on 127.0.0.1.

Both peers start at once, pointed at a bare DHT node in this process (as ``vitpeer demo`` does), train to
``--max-steps`` and must end with the same parameters, having averaged with each other. hivemind 1.1.12's Optimizer
left its own client_mode None unless it was passed, so a client-mode peer of the gradient algorithm once exited after
its first state download ("averager in client mode cannot share its state"): ``HivemindStrategy`` now passes it.
Peers behind a real NAT: ``test_nat.py``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import hivemind
import pytest
import torch
from processes import spawn

from vitpeer.peer.core.runtime.processes import stop_all

pytestmark = pytest.mark.slow

STEP_LINE = re.compile(r"swarm step (\d+)/(\d+) \| peers (\d+)")
# swarm steps large enough (one alone: 2-7 s) that a peer whose start lags the other's by seconds still meets it
RUNS = {
    "gradient": ["--config", "digits_tiny_gradient", "--max-steps", "4", "--target-batch-size", "1024"],
    "diloco": ["--config", "digits_tiny_diloco", "--max-steps", "3", "--target-batch-size", "2048"],
}
COMMON = ["--batch-size", "32", "--host-maddr", "/ip4/127.0.0.1/tcp/0", "--matchmaking-time", "1.0"]
COMMON += ["--averaging-timeout", "10"]


def swarm_steps(log: Path) -> list[tuple[int, int, int]]:
    """(step, max steps, peers) of each ``swarm step N/M | peers P`` line a peer printed."""
    return [tuple(map(int, found)) for found in STEP_LINE.findall(log.read_text())]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm", sorted(RUNS))
def test_a_client_mode_peer_trains_to_the_end_with_a_public_peer(tmp_path: Path, algorithm: str):
    bootstrap = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    processes: dict[str, subprocess.Popen] = {}
    try:
        meet = ["--initial-peers", str(bootstrap.get_visible_maddrs()[0])]
        for name, extra in (("public", []), ("client", ["--client-mode"])):
            out = tmp_path / name
            out.mkdir()
            command = ["join", *RUNS[algorithm], *COMMON, *meet, *extra, "--output-dir", str(out)]
            processes[name] = spawn(command, out / "log.txt")
        for name, process in processes.items():
            code = process.wait(timeout=240)
            assert code == 0, f"{name} exited {code}:\n" + (tmp_path / name / "log.txt").read_text()[-3000:]
    finally:
        stop_all(list(processes.values()))
        bootstrap.shutdown()
    max_steps = int(RUNS[algorithm][RUNS[algorithm].index("--max-steps") + 1])
    for name in processes:
        found = swarm_steps(tmp_path / name / "log.txt")
        assert found and found[-1][:2] == (max_steps, max_steps), (name, found)
        assert any(peers == 2 for _, _, peers in found), f"{name} never averaged with the other: {found}"
    client_log = (tmp_path / "client" / "log.txt").read_text()
    assert "cannot share its state" not in client_log and "Traceback" not in client_log, client_log[-3000:]
    assert f"--initial-peers {meet[1]} (this peer's own initial peers" in client_log  # not its undialable address
    states = [torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False) for name in processes]
    assert states[0]["swarm_epoch"] == states[1]["swarm_epoch"] == max_steps
    for key, tensor in states[0]["state_dict"].items():
        torch.testing.assert_close(tensor, states[1]["state_dict"][key], rtol=0, atol=1e-5, msg=key)
