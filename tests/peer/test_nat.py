"""Volunteers behind NAT, for real: Linux network namespaces with a masquerading router (``tests/netns.py``).

A bare hivemind DHT node (the meeting point) listens on the public host; ``vitpeer join`` runs in the namespaces with
``ip netns exec``. Each private host is behind a NAT of its own: it can dial the public host, nobody can dial it.
Measured with hivemind 1.1.12 (gradient algorithm, 4 swarm steps of 1024):

- a public peer and two ``--client-mode`` peers behind NAT average every round together (all three counted, no
  failed round on the public peer);
- two ``--client-mode`` peers behind NAT with no public peer that trains: no round ever finds a group ("could not
  find a group"), each trains alone to the end. A client-mode averager never leads a group, so someone reachable
  must train too. (``--auto-relay`` peers instead of client mode did the same in a 40 s run: no round averaged.)
- ``vitpeer doctor`` behind the NAT says to join with ``--client-mode``.

Skipped, with the reason, where namespaces cannot be made (not root, no ``ip``, no ``nft``/``iptables``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest
from processes import spawn, wait_for

from vitpeer.peer.core.runtime.processes import stop_all

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(bool(netns.unavailable()), reason=str(netns.unavailable())),
]

STEPS = 4
FLAGS = ["--config", "digits_tiny_gradient", "--target-batch-size", "1024", "--batch-size", "32"]
FLAGS += ["--matchmaking-time", "1.0", "--averaging-timeout", "10"]
STEP_LINE = re.compile(r"swarm step (\d+)/\d+ \| peers (\d+)")
NO_GROUP = "could not find a group"  # hivemind's error when a round gathers no one to average with
BOOTSTRAP = """
import os, sys, time, hivemind
dht = hivemind.DHT(start=True, host_maddrs=[sys.argv[1]])
with open(sys.argv[2] + ".tmp", "w") as out:
    out.write(" ".join(str(addr) for addr in dht.get_visible_maddrs()))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
while True:
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[netns.Nat, str]]:
    """The topology with two private hosts, and the meeting point's address on the public host."""
    root = tmp_path_factory.mktemp("nat")
    with netns.nat(privates=2) as topology:
        address = root / "bootstrap.txt"
        command = [*topology.enter(topology.public), sys.executable, "-c", BOOTSTRAP]
        with (root / "bootstrap.log").open("w") as log:
            bootstrap = subprocess.Popen(
                [*command, f"/ip4/{topology.public_ip}/tcp/0", str(address)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for("the bootstrap node's address", lambda: address.is_file() or bootstrap.poll() is not None, 60)
            assert address.is_file(), (root / "bootstrap.log").read_text()[-3000:]
            yield topology, address.read_text().split()[0]
        finally:
            stop_all([bootstrap])  # before the namespaces go


def train(
    tmp_path: Path,
    topology: netns.Nat,
    meet: str,
    run_id: str,
    peers: dict[str, tuple[str, list[str]]],
) -> dict[str, str]:
    """Start ``peers`` (name: namespace, extra flags) at once under ``run_id`` to ``STEPS``; wait for all to exit;
    their logs."""
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, (namespace, extra) in peers.items():
            out = tmp_path / name
            out.mkdir()
            command = ["join", *FLAGS, "--max-steps", str(STEPS), "--run-id", run_id, "--initial-peers", meet]
            command += ["--output-dir", str(out), *extra]
            processes[name] = spawn(command, out / "log.txt", prefix=topology.enter(namespace))
        for name, process in processes.items():
            code = process.wait(timeout=200)
            assert code == 0, f"{name} exited {code}:\n" + (tmp_path / name / "log.txt").read_text()[-3000:]
    finally:
        stop_all(list(processes.values()))
    return {name: (tmp_path / name / "log.txt").read_text() for name in peers}


def counted(log: str) -> list[tuple[int, int]]:
    return [(int(step), int(peers)) for step, peers in STEP_LINE.findall(log)]


@pytest.mark.timeout(300)
def test_client_mode_peers_behind_nat_average_with_a_public_peer(tmp_path: Path, swarm):
    topology, meet = swarm
    public = ["--host-maddr", f"/ip4/{topology.public_ip}/tcp/0"]
    logs = train(
        tmp_path,
        topology,
        meet,
        "vitpeer-nat-public",
        {
            "public": (topology.public, public),
            "behind-nat-1": (topology.private[0], ["--client-mode"]),
            "behind-nat-2": (topology.private[1], ["--client-mode"]),
        },
    )
    for name, log in logs.items():
        steps = counted(log)
        assert steps and steps[-1][0] == STEPS, (name, steps)
        assert max(peers for _, peers in steps) == 3, f"{name} never counted all three: {steps}"
        assert "cannot share its state" not in log
    assert NO_GROUP not in logs["public"], logs["public"][-3000:]  # every round it led found the clients


@pytest.mark.timeout(300)
def test_client_mode_peers_alone_behind_nat_train_but_never_average(tmp_path: Path, swarm):
    """No public peer trains: each client-mode peer ends its run alone; every round it tried found no group."""
    topology, meet = swarm
    flags = ["--client-mode", "--averaging-timeout", "3"]  # every round fails: fail them fast
    clients = {f"behind-nat-{i}": (namespace, flags) for i, namespace in enumerate(topology.private, 1)}
    logs = train(tmp_path, topology, meet, "vitpeer-nat-clients", clients)
    for name, log in logs.items():
        assert counted(log)[-1][0] == STEPS, (name, counted(log))
        assert NO_GROUP in log, f"{name} averaged after all:\n{log[-3000:]}"


@pytest.mark.timeout(120)
def test_doctor_behind_nat_says_to_join_in_client_mode(swarm):
    topology, meet = swarm
    env = {key: value for key, value in os.environ.items() if not key.startswith("VITPEER_")}
    doctor = [sys.executable, "-c", "from vitpeer.peer.commands.doctor import command; command()"]
    result = subprocess.run(
        [*topology.enter(topology.private[0]), *doctor, "--initial-peers", meet, "--timeout", "15"],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=100,
    )
    found = re.search(r"^(ok|warn|FAIL) +reachability  .*$", result.stdout, re.MULTILINE)
    assert found, result.stdout + result.stderr
    assert found.group(1) == "warn" and "--client-mode" in found.group(0), found.group(0)
    assert f"from {topology.private_ips[0]}, a private address" in found.group(0), found.group(0)
    assert re.search(r"^ok +initial peers ", result.stdout, re.MULTILINE), result.stdout  # it does reach out
    assert result.returncode == 0, result.stdout + result.stderr  # a warning: client mode works
