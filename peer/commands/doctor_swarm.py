"""``vitpeer doctor``'s checks of the swarm: the p2p daemon starts, the initial peers answer, they can dial this host
back, the coordinator answers.

What can hang is bounded by the ``timeout`` each check takes: the p2p daemon start, the connection to the initial
peers, the coordinator's answer. Every hivemind DHT process started here is stopped on the way out, and with it its
p2p daemon (``p2pd``), even when the start failed half-way (``running_dht``, ``stop_dht``).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from functools import partial
from typing import Any

from vitpeer.peer.commands.doctor_host import HIVEMIND_TESTED, Check
from vitpeer.peer.core.config import peer_multiaddr_problem
from vitpeer.peer.core.runtime.processes import children_die_with_us, descendants, in_background, kill_and_reap

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
"""Where the doctor's own DHT nodes listen: this host only, any free port (it needs no incoming connections)."""
COORDINATOR_RETRY = 3.0
"""Seconds to keep retrying a coordinator that refuses connections (it may be restarting); at most ``--timeout``."""
PEER_FORM = "/ip4/HOST/tcp/PORT/p2p/PEER_ID"
PING_WAIT = 4.0
"""Seconds the pings after connecting may take at least: hivemind gives up on one after 3 s (its ``wait_timeout``)."""


# --- hivemind's p2p daemon -----------------------------------------------------------------------------------------


def check_p2p_daemon(timeout: float) -> list[Check]:
    """Start a DHT node on loopback (a forked DHT process and its Go ``p2pd``), time it, stop it."""
    try:
        with running_dht(timeout) as (dht, seconds):
            peer_id = dht.peer_id.to_base58()
    except Exception as err:
        found = f"within {timeout:.0f} s" if _is_timeout(err) else f"({str(err) or type(err).__name__})"
        advice = (
            f"reinstall hivemind (pip install --force-reinstall hivemind=={HIVEMIND_TESTED}) so that its p2pd "
            "binary matches this platform, or rerun with --verbose for the daemon's own log"
        )
        return [Check("p2p daemon", "FAIL", f"did not start {found}; {advice}")]
    return [Check("p2p daemon", "ok", f"started in {seconds:.1f} s and stopped again (test peer id {peer_id})")]


# --- the swarm: initial peers and the coordinator ------------------------------------------------------------------


def check_initial_peers(initial_peers: Sequence[str], timeout: float) -> list[Check]:
    """Validate each multiaddr, then connect a client-mode DHT node to the valid ones within ``timeout`` seconds
    and ping each of them: a FAIL when none answers, a warning when only some do."""
    checks, valid = [], []
    for addr in initial_peers:
        problem = peer_multiaddr_problem(addr)
        if problem is None:
            valid.append(addr)
            continue
        detail = f"{addr!r} is not a peer multiaddr ({problem}); expected {PEER_FORM}, as the first peer prints it"
        checks.append(Check("initial peer", "FAIL", detail))
    if not valid:
        return checks
    tried = ", ".join(valid)
    advice = "check the addresses, that those peers are running, and that their port is open to you"
    started = time.monotonic()
    try:
        with running_dht(timeout, initial_peers=valid) as (dht, connected):
            pinging = dht.run_coroutine(partial(_ping_peers, valid), return_future=True)
            try:  # each ping gives up after hivemind's wait_timeout (3 s); a stuck DHT process gets no longer
                answers = pinging.result(timeout=max(PING_WAIT, timeout - connected))
            except FutureTimeout:
                answers = {}
    except Exception as err:
        if _is_timeout(err):
            reason = f"no answer within {timeout:.0f} s"
        elif "bootstrap" in str(err).lower() or "responded" in str(err):  # p2pd could not dial, or no ping answer
            reason = f"no answer (gave up after {time.monotonic() - started:.1f} s)"
        else:
            reason = str(err) or type(err).__name__
        return [*checks, Check("initial peers", "FAIL", f"{reason} from {tried}; {advice}")]
    silent = [addr for addr in valid if answers.get(addr) is None]
    pings = ", ".join(f"{answers[addr] * 1000:.0f} ms" for addr in valid if answers.get(addr) is not None)
    found = f"connected in {connected:.1f} s; {len(valid) - len(silent)} of {len(valid)} answered (ping {pings})"
    if not silent:
        return [*checks, Check("initial peers", "ok", found)]
    if len(silent) == len(valid):
        return [*checks, Check("initial peers", "FAIL", f"connected, but none answered a ping; {advice}")]
    return [*checks, Check("initial peers", "warn", f"{found}; no answer from {', '.join(silent)}: {advice}")]


async def _ping_peers(addrs: list[str], _dht: Any, node: Any) -> dict[str, float | None]:
    """Inside the DHT process: each peer's ping round trip in seconds, or None when it did not answer."""
    import asyncio

    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    async def ping(addr: str) -> float | None:
        started = time.monotonic()
        answer = await node.protocol.call_ping(PeerID.from_base58(Multiaddr(addr)["p2p"]))
        return None if answer is None else time.monotonic() - started

    return dict(zip(addrs, await asyncio.gather(*(ping(addr) for addr in addrs)), strict=True))


def check_reachability(initial_peers: Sequence[str], client_mode: bool) -> list[Check]:
    """Can the swarm dial this host back? The address this host reaches each public initial peer from: a private one
    (10.x, 192.168.x, 100.64.x, ...) means a NAT between, so peers on the internet cannot open connections to it.

    Nothing is sent (a UDP ``connect`` only picks the route). Peers on this host or on a private network are not
    judged: they share the network. Behind NAT, join with --client-mode (such a peer trains and averages through a
    public one: ``tests/peer/test_nat.py``) or forward the port.
    """
    if client_mode:
        return [Check("reachability", "ok", "client mode: you only dial out, so no one needs to reach you")]
    seen: dict[str, str] = {}  # the peer's IP -> this host's address toward it
    for addr in initial_peers:
        if peer_multiaddr_problem(addr) is None and addr.startswith("/ip4/"):
            peer_ip = addr.split("/")[2]
            if ipaddress.ip_address(peer_ip).is_global and peer_ip not in seen:
                local = _local_address_toward(peer_ip)
                if local is not None:
                    seen[peer_ip] = local
    behind = {peer: local for peer, local in seen.items() if not ipaddress.ip_address(local).is_global}
    if behind:
        peer, local = next(iter(behind.items()))
        detail = (
            f"you reach {peer} from {local}, a private address: a NAT is in between and peers cannot dial you back; "
            "join with --client-mode (you still train and average through reachable peers) or --auto-relay, or "
            "forward --host-port on your router and add --announce-ip YOUR_PUBLIC_IP"
        )
        return [Check("reachability", "warn", detail)]
    if seen:
        where = ", ".join(sorted(set(seen.values())))
        detail = f"you reach the swarm from {where}, a public address: others can dial you if your firewall lets them"
        return [Check("reachability", "ok", detail)]
    return []


def _local_address_toward(ip: str) -> str | None:
    """This host's source address on the route to ``ip`` (no packet leaves: a UDP socket only connects)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((ip, 9))
            return probe.getsockname()[0]
        except OSError:  # no route
            return None


def check_coordinator_status(url: str, timeout: float) -> list[Check]:
    """GET ``url``/status within ``timeout`` seconds and report the run id and how many peers it lists."""
    from vitpeer.peer.core.runtime.http import coordinator_get

    started = time.monotonic()
    fetch = in_background(coordinator_get, url, "status", min(COORDINATOR_RETRY, timeout))
    advice = "check the address (http://HOST:PORT, the coordinator's --http-port) and that its port is open to you"
    try:
        text = fetch(timeout)
    except TimeoutError:
        return [Check("coordinator", "FAIL", f"{url} did not answer within {timeout:.0f} s; {advice}")]
    except (ValueError, RuntimeError) as err:  # coordinator_get's own messages say what to do
        return [Check("coordinator", "FAIL", str(err))]
    elapsed = time.monotonic() - started
    try:
        status = json.loads(text)
        run_id, peers = status["run_id"], status["peers"]
    except (ValueError, KeyError, TypeError):
        detail = f"{url}/status answered, but not with a vitpeer coordinator's status (run_id, peers); {advice}"
        return [Check("coordinator", "FAIL", detail)]
    count = len(peers) if isinstance(peers, list) else 0
    detail = f"{url} answered in {elapsed:.1f} s: run {run_id!r}, {count} peer{'s' if count != 1 else ''} listed"
    return [Check("coordinator", "ok", detail)]


# --- starting and stopping hivemind without leaving processes behind -----------------------------------------------


@contextmanager
def running_dht(timeout: float, initial_peers: Sequence[str] = ()) -> Iterator[tuple[Any, float]]:
    """A hivemind DHT node on loopback and the seconds it took to be ready, within ``timeout`` seconds (else
    TimeoutError or hivemind's error); client mode when it has ``initial_peers`` to join. Stopped on the way out,
    on every path."""
    import hivemind

    children_die_with_us()  # the DHT process dies with us, even if we are killed
    dht = hivemind.DHT(
        initial_peers=list(initial_peers) or None,
        start=False,
        host_maddrs=[LOOPBACK],
        client_mode=bool(initial_peers),
        startup_timeout=timeout,  # hivemind's own bound on p2pd's start (which dials the initial peers)
        shutdown_timeout=2,
    )
    ready = False
    started = time.monotonic()
    try:
        dht.run_in_background(await_ready=True, timeout=timeout)  # our bound on the whole start, bootstrap included
        ready = True
        yield dht, time.monotonic() - started
    finally:
        stop_dht(dht, graceful=ready)


def stop_dht(dht: Any, graceful: bool) -> None:
    """Stop a DHT process and its p2p daemon: ask it to shut down when it is serving, else terminate it.

    A DHT process still starting does not read its command pipe, so asking would only wait ``shutdown_timeout``;
    terminating it skips hivemind's own p2pd shutdown, so the daemons seen under it are stopped here.
    """
    if dht.pid is None:  # never started
        return
    daemons = [pid for pid, name in descendants(dht.pid) if name == "p2pd"]
    try:
        if graceful and dht.is_alive():
            dht.shutdown()  # waits ``shutdown_timeout``, then terminates
    except (OSError, EOFError):  # its pipe is gone with the process
        pass
    if dht.is_alive():
        dht.terminate()
    dht.join(timeout=3)
    if dht.is_alive():
        dht.kill()
        dht.join()
    for pid in daemons:
        kill_and_reap(pid)


def _is_timeout(err: BaseException) -> bool:
    """hivemind's futures raise concurrent.futures.TimeoutError, which is TimeoutError only from Python 3.11."""
    return isinstance(err, TimeoutError | FutureTimeout)
