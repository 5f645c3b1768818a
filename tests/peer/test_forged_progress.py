"""A forged progress record beside a 2-peer diloco swarm on 127.0.0.1: a plain hivemind node (no vitpeer code) stores,
signed with its own key, a record claiming swarm step 1,000,000, and renews it while the peers train. hivemind counts
every signed record as a peer and takes the swarm's step as the maximum of them: the peers would count three, try to
catch up with a step nobody can serve, and stop averaging. They count only records whose step most records agree on
(``remote_state.plausible_limit``): they must train to the end together, counting two, and say what they left out."""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import get_dht_time
from processes import spawn

from vitpeer.peer.core.averaging.remote_state import can_read_progress
from vitpeer.peer.core.runtime.processes import stop_all

pytestmark = pytest.mark.slow

RUN_ID = "vitpeer-digits-diloco"  # digits_tiny_diloco's
STEPS = 6
FLAGS = ["--config", "digits_tiny_diloco", "--max-steps", str(STEPS), "--target-batch-size", "2048"]
FLAGS += ["--host-maddr", "/ip4/127.0.0.1/tcp/0", "--matchmaking-time", "1.0", "--averaging-timeout", "10"]
STEP_LINE = re.compile(r"swarm step (\d+)/\d+ \| peers (\d+)")


def forge(dht: hivemind.DHT, epoch: int) -> None:
    """Store a progress record claiming ``epoch``, signed with this process's key, as hivemind's tracker would."""
    key = RSASignatureValidator().local_public_key
    record = LocalTrainingProgress(
        peer_id=dht.peer_id.to_bytes(),
        epoch=epoch,
        samples_accumulated=0,
        samples_per_second=100.0,
        time=get_dht_time(),
        client_mode=False,
    )
    dht.store(f"{RUN_ID}_progress", record.dict(), get_dht_time() + 60, subkey=key)


def renew(dht: hivemind.DHT, stop: threading.Event) -> None:
    while not stop.wait(5):
        forge(dht, 10**6)


@pytest.mark.timeout(240)
def test_a_record_claiming_step_a_million_changes_nothing_for_the_honest_peers(tmp_path: Path):
    processes: dict[str, subprocess.Popen] = {}
    forger: hivemind.DHT | None = None
    stop = threading.Event()
    bootstrap = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        meet = ["--initial-peers", str(bootstrap.get_visible_maddrs()[0])]
        forger = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=meet[1:])
        can_read_progress(forger, RUN_ID)  # the validators that sign the record, as a tracker's
        forge(forger, 10**6)
        threading.Thread(target=renew, args=(forger, stop), daemon=True).start()
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            command = ["join", *FLAGS, *meet, "--output-dir", str(tmp_path / name)]
            processes[name] = spawn(command, tmp_path / name / "log.txt")
        for name, process in processes.items():
            code = process.wait(timeout=180)
            assert code == 0, f"{name} exited {code}:\n" + (tmp_path / name / "log.txt").read_text()[-3000:]
    finally:
        stop.set()
        stop_all(list(processes.values()))
        if forger is not None:
            forger.shutdown()
        bootstrap.shutdown()
    for name in processes:
        log = (tmp_path / name / "log.txt").read_text()
        steps = [(int(step), int(peers)) for step, peers in STEP_LINE.findall(log)]
        assert steps and steps[-1][0] == STEPS, (name, steps, log[-3000:])
        assert max(peers for _, peers in steps) == 2, (name, steps)  # the forger was never counted
        assert sum(peers == 2 for _, peers in steps) >= STEPS - 2, (name, steps)  # they trained together
        assert "claim swarm steps [1000000]" in log and "not counted" in log, log[-3000:]
