"""Joining the swarm: start a hivemind DHT node from ``SwarmConfig`` and say how others reach it.

hivemind listens on loopback unless told otherwise and, listening on all interfaces, may print only 127.0.0.1
(hivemind#628). ``reachable_maddrs`` lists the addresses another host can actually dial, so the printed
``--initial-peers`` line works when pasted on another machine.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Sequence

import hivemind
from hivemind.utils.multiaddr import Multiaddr

from vitpeer.peer.core.averaging.hivemind_averagers import sign_with_identity
from vitpeer.peer.core.config import SwarmConfig
from vitpeer.peer.core.runtime.processes import children_die_with_us
from vitpeer.peer.core.swarm.records import record_validators


def listen_maddrs(swarm: SwarmConfig) -> list[str]:
    """Where the p2p daemon listens: the configured multiaddrs, else every IPv4 interface at ``host_port``."""
    return swarm.host_maddrs or [f"/ip4/0.0.0.0/tcp/{swarm.host_port}"]


def announce_maddrs(swarm: SwarmConfig) -> list[str]:
    """Addresses to announce to peers: explicit ones, or ``announce_ip`` at ``host_port``."""
    if swarm.announce_maddrs:
        return list(swarm.announce_maddrs)
    if swarm.announce_ip:
        if swarm.host_port == 0:
            raise ValueError("swarm.announce_ip needs a fixed swarm.host_port (the port others dial), not 0")
        return [f"/ip4/{swarm.announce_ip}/tcp/{swarm.host_port}"]
    return []


def start_dht(swarm: SwarmConfig, **extra) -> hivemind.DHT:
    """Start this peer's DHT node and connect it to ``swarm.initial_peers``; raise RuntimeError with a way out.

    With ``swarm.identity_path``, this process signs its records with that identity's key (``sign_with_identity``),
    so their signer is the peer id, the same after a restart."""
    children_die_with_us()
    fresh_identity = False
    if swarm.identity_path is not None:  # before the validators are built and the DHT process forks: both keep it
        fresh_identity = sign_with_identity(swarm.identity_path)
    try:
        return hivemind.DHT(
            initial_peers=swarm.initial_peers,
            start=True,
            host_maddrs=listen_maddrs(swarm),
            announce_maddrs=announce_maddrs(swarm),
            identity_path=str(swarm.identity_path) if swarm.identity_path else None,
            # hivemind asks the initial peers whether an existing identity is taken; one just created cannot be
            # (hivemind skips the check for the identities it creates itself)
            check_if_identity_free=not fresh_identity,
            client_mode=swarm.client_mode,  # the swarm optimizer and its averagers take it from here
            use_relay=swarm.use_relay,
            use_auto_relay=swarm.use_auto_relay,
            startup_timeout=swarm.startup_timeout,
            record_validators=record_validators(swarm.run_id),  # signed, schema-checked metrics records
            **extra,
        )
    except Exception as err:  # hivemind raises bare Exceptions/RuntimeErrors from the daemon and the bootstrap
        message = str(err)
        if "initial_peers responded" in message or "bootstrap" in message.lower():
            raise RuntimeError(
                f"none of the initial peers answered ({', '.join(swarm.initial_peers)}): check the addresses, "
                "that those peers are running, and that their port is open to you"
            ) from err
        if "Daemon failed to start" in message or isinstance(err, TimeoutError):  # wait_for(startup_timeout)
            raise RuntimeError(
                f"the p2p daemon did not start in {swarm.startup_timeout:.0f} s; raise swarm.startup_timeout "
                "or check that the listen port is free"
            ) from err
        raise


def default_route_ip() -> str | None:
    """The local IP of the interface that routes to the internet (a UDP 'connect' sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed, only used to pick the outgoing interface
            return probe.getsockname()[0]
        except OSError:
            return None


def reachable_maddrs(dht: hivemind.DHT, swarm: SwarmConfig) -> list[str]:
    """Full multiaddrs (with /p2p/<peer id>) that other hosts can dial; loopback only when nothing else exists."""
    peer_id = dht.peer_id.to_base58()
    visible = [str(addr) for addr in dht.get_visible_maddrs()]
    listens_everywhere = any("/0.0.0.0/" in addr for addr in listen_maddrs(swarm))
    if listens_everywhere and not announce_maddrs(swarm):
        ports = {Multiaddr(addr).value_for_protocol("tcp") for addr in visible if "/tcp/" in addr}
        ports = {port for port in ports if port is not None}  # None stands for no value: never tcp's
        route_ip = default_route_ip()
        if route_ip and not route_ip.startswith("127."):
            visible += [f"/ip4/{route_ip}/tcp/{port}/p2p/{peer_id}" for port in sorted(ports)]
    addrs = []
    for addr in visible:
        if "/p2p/" not in addr:
            addr = f"{addr}/p2p/{peer_id}"
        if addr not in addrs:
            addrs.append(addr)
    public = [addr for addr in addrs if not addr.startswith(("/ip4/127.", "/ip6/::1"))]
    return public if public and listens_everywhere else addrs


def data_order_seed(dht: hivemind.DHT, seed: int) -> int:
    """A data-order seed unique to this peer (its peer id mixed with the run seed): no two peers share batches."""
    digest = hashlib.sha256(f"{seed}:{dht.peer_id.to_base58()}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def join_hint(maddrs: Sequence[str], run_id: str, client_mode: bool = False, initial_peers: Sequence[str] = ()) -> str:
    """The ready-to-paste command line for other volunteers: through this peer's addresses, or, for a client-mode
    peer (which no one can dial), through the initial peers it joined by."""
    hint = f"vitpeer join --run-id {run_id} --initial-peers {' '.join(initial_peers if client_mode else maddrs)}"
    if client_mode:
        hint += " (this peer's own initial peers: it runs in --client-mode, so no one can dial it)"
    return hint
