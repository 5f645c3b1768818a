"""The printed --initial-peers line: reachable addresses, never only 127.0.0.1 (hivemind#628)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vitpeer.peer.core.config import SwarmConfig
from vitpeer.peer.core.swarm.dht import join_hint, reachable_maddrs, start_dht

SETUP = (
    "ip link set lo up && ip link add v0 type veth peer name v1 && ip addr add 10.77.0.2/24 dev v0 && "
    "ip link set v0 up && ip link set v1 up && ip route add default via 10.77.0.1 dev v0"
)
PROBE = """
import json
from vitpeer.peer.core.config import SwarmConfig
from vitpeer.peer.core.swarm.dht import reachable_maddrs, start_dht
swarm = SwarmConfig()
dht = start_dht(swarm)
print(json.dumps(reachable_maddrs(dht, swarm)))
dht.shutdown()
"""


def test_loopback_peer_prints_its_loopback_address():
    swarm = SwarmConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dht = start_dht(swarm)
    try:
        addrs = reachable_maddrs(dht, swarm)
        peer_id = dht.peer_id.to_base58()
    finally:
        dht.shutdown()
    assert addrs and all(addr.startswith("/ip4/127.0.0.1/tcp/") and addr.endswith(f"/p2p/{peer_id}") for addr in addrs)
    assert join_hint(addrs, "r1") == f"vitpeer join --run-id r1 --initial-peers {' '.join(addrs)}"
    through = ["/ip4/203.0.113.5/tcp/31337/p2p/QmPublic"]
    hint = join_hint(addrs, "r1", client_mode=True, initial_peers=through)  # no one can dial a client-mode peer
    assert hint.startswith(f"vitpeer join --run-id r1 --initial-peers {through[0]} (") and addrs[0] not in hint


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_peer_listening_everywhere_prints_its_interface_address_not_loopback():
    """In a network namespace of our own with one interface (10.77.0.2), listening on 0.0.0.0."""
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here (needs root or user namespaces)")
    script = f"{SETUP} && exec {sys.executable} -c '{PROBE}'"
    result = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr[-2000:]
    addrs = json.loads(result.stdout.strip().splitlines()[-1])
    assert any(addr.startswith("/ip4/10.77.0.2/tcp/") for addr in addrs), addrs
    assert not any(addr.startswith("/ip4/127.") for addr in addrs), addrs
