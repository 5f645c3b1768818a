"""``vitpeer doctor``: check this host before joining a swarm, one line per finding and what to do about it.

Each check is a small function returning ``Check`` records; ``run_doctor`` runs them in a fixed order and the click
``command`` prints them (or ``--json``) and exits 1 when any of them FAILs. Warnings never fail: a CPU-only host can
train, only slowly.

What can hang is bounded by ``--timeout``: the p2p daemon start, the connection to ``--initial-peers`` and the
coordinator's answer (fetched in a thread while the p2p checks run, so both together still take about one timeout).
Every hivemind DHT process started here is stopped on the way out, and with it its p2p daemon (``p2pd``), even when
the start failed half-way: a DHT process that dies leaves its ``p2pd`` orphaned, so while the checks run this process
adopts orphans (Linux "child subreaper") and stops any ``p2pd`` still running at the end.
"""

from __future__ import annotations

import ipaddress
import json
import platform
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Literal

import click

from vitpeer.peer.core.config import peer_multiaddr_problem, split_peer_list
from vitpeer.peer.core.config.options import setup_logging
from vitpeer.peer.core.runtime.processes import (
    adopting_orphans,
    children_die_with_us,
    descendants,
    in_background,
    kill_and_reap,
)

Status = Literal["ok", "warn", "FAIL"]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
"""Where the doctor's own DHT nodes listen: this host only, any free port (it needs no incoming connections)."""
HIVEMIND_TESTED = "1.1.12"
COORDINATOR_RETRY = 3.0
"""Seconds to keep retrying a coordinator that refuses connections (it may be restarting); at most ``--timeout``."""
PEER_FORM = "/ip4/HOST/tcp/PORT/p2p/PEER_ID"
PING_WAIT = 4.0
"""Seconds the pings after connecting may take at least: hivemind gives up on one after 3 s (its ``wait_timeout``)."""


@dataclass(frozen=True)
class Check:
    """One finding. ``detail`` says what was found and, for warn and FAIL, what to do about it."""

    name: str
    status: Status
    detail: str


# --- this host: Python, torch, GPUs --------------------------------------------------------------------------------


def check_python() -> list[Check]:
    """The interpreter that will run vitpeer (an older one than 3.10 could not even import this command)."""
    return [Check("python", "ok", f"{platform.python_version()} ({sys.executable})")]


def check_torch() -> list[Check]:
    """torch's version, then CUDA with NCCL and every GPU, or bf16 on the CPU when no GPU is visible."""
    try:
        import torch
    except Exception as err:  # a broken install raises more than ImportError (OSError from a missing .so)
        return [Check("torch", "FAIL", f"does not import ({err}); install it: pip install 'torch>=2.4'")]
    checks = [Check("torch", "ok", torch.__version__)]
    if not torch.cuda.is_available():
        built = f"torch built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch build"
        advice = (
            f"have a GPU? check nvidia-smi, and that its driver supports CUDA {torch.version.cuda}"
            if torch.version.cuda
            else "have a GPU? install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
        )
        checks.append(Check("cuda", "warn", f"no CUDA GPU visible ({built}): training runs on CPU (slow); {advice}"))
        return checks + check_cpu_bf16()
    count = torch.cuda.device_count()
    checks.append(Check("cuda", "ok", f"CUDA {torch.version.cuda}, {count} GPU{'s' if count != 1 else ''} visible"))
    checks.append(check_nccl())
    for index in range(count):
        checks.append(check_gpu(index))
    return checks


def check_nccl() -> Check:
    """NCCL carries gradients between this host's GPUs when one peer uses several (``--local-strategy ddp``)."""
    from torch.cuda import nccl  # torch imports it on its way in, but its types do not show torch.cuda.nccl

    try:
        version = nccl.version()
    except Exception as err:  # torch built without NCCL
        return Check("nccl", "warn", f"not available ({err}); several GPUs in one peer need a torch build with NCCL")
    shown = ".".join(str(part) for part in version) if isinstance(version, tuple) else str(version)
    return Check("nccl", "ok", shown)


def check_gpu(index: int) -> Check:
    """A GPU's name, memory and bf16 support (``--precision bf16-mixed`` needs Ampere or newer)."""
    import torch

    props = torch.cuda.get_device_properties(index)
    with torch.cuda.device(index):
        bf16 = torch.cuda.is_bf16_supported()
    found = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}"
    if bf16:
        return Check(f"gpu {index}", "ok", f"{found}, bf16 supported")
    return Check(f"gpu {index}", "warn", f"{found}, no bf16: train with --precision 32 (bf16-mixed needs Ampere+)")


def check_cpu_bf16() -> list[Check]:
    """On a CPU, bf16-mixed is fine: run one tiny autocast matmul to be sure this CPU and torch build agree."""
    import torch

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            product = torch.ones(4, 4) @ torch.ones(4, 4)
        assert product.dtype == torch.bfloat16 and float(product[0, 0]) == 4.0
    except Exception as err:
        return [Check("bf16", "warn", f"bf16 autocast fails on this CPU ({err!r}): train with --precision 32")]
    return [Check("bf16", "ok", "bf16-mixed works on this CPU")]


# --- hivemind and its p2p daemon -----------------------------------------------------------------------------------


def check_hivemind() -> list[Check]:
    """hivemind imports, and is the version vitpeer is tested with."""
    try:
        import hivemind
    except Exception as err:
        advice = f"install it: pip install hivemind=={HIVEMIND_TESTED}"
        return [Check("hivemind", "FAIL", f"does not import ({err}); {advice}")]
    if hivemind.__version__ != HIVEMIND_TESTED:
        advice = f"vitpeer is tested with {HIVEMIND_TESTED}: pip install hivemind=={HIVEMIND_TESTED}"
        return [Check("hivemind", "warn", f"{hivemind.__version__}; {advice}")]
    return [Check("hivemind", "ok", hivemind.__version__)]


def check_swarm_module() -> list[Check]:
    """vitpeer's own swarm code imports (it brings in Lightning): nothing on this list, only a FAIL when it breaks."""
    try:
        import vitpeer.peer.core.swarm.dht  # noqa: F401
    except Exception as err:
        return [
            Check(
                "vitpeer",
                "FAIL",
                f"vitpeer.peer.core.swarm.dht does not import ({err!r}); reinstall vitpeer: pip install -e .",
            )
        ]
    return []


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


def check_port(name: str, port: int | None, host: str, option: str) -> list[Check]:
    """A port given as ``option`` is free on ``host``: bind a TCP socket there (nothing when not given, or 0).

    ``SO_REUSEADDR`` as the p2p daemon and Prometheus' server use it: a port left in TIME_WAIT by a run that just
    ended is free for them, and so is it here; a port another program listens on is not.
    """
    if not port:
        return []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except PermissionError:
        return [Check(name, "FAIL", f"TCP {port} needs root (ports below 1024 are privileged); pick {option} 1024+")]
    except OSError as err:
        spare = _free_port_near(port, host)
        instead = f"{option} {spare}" if spare else f"another {option}"
        return [
            Check(
                name,
                "FAIL",
                f"TCP {port} is busy on {host} ({err.strerror}): another program (or a vitpeer still running) "
                f"holds it; stop it, or pick {instead}, or {option} 0 for any free port",
            )
        ]
    if option == "--host-port":
        return [Check(name, "ok", f"TCP {port} is free on {host}; others reach you only if your firewall lets it in")]
    return [Check(name, "ok", f"TCP {port} is free on {host}")]


def _free_port_near(port: int, host: str, tries: int = 20) -> int | None:
    """The first free port above ``port``, to suggest in place of a busy one."""
    for candidate in range(port + 1, min(port + 1 + tries, 65536)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, candidate))
            except OSError:
                continue
            return candidate
    return None


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
    judged: they share the network. Behind NAT, join with --client-mode (measured: trains and averages through a
    public peer) or forward the port.
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


# --- starting and stopping hivemind without leaving processes behind ----------------------------------------------


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


# --- all together --------------------------------------------------------------------------------------------------


def run_doctor(
    initial_peers: list[str] | tuple[str, ...] = (),
    coordinator: str | None = None,
    host_port: int | None = None,
    metrics_port: int | None = None,
    timeout: float = 15.0,
    client_mode: bool = False,
) -> list[Check]:
    """Every check in order: this host, hivemind, ports, initial peers and whether they can reach this host back,
    coordinator.

    ``timeout`` bounds each network wait; the coordinator is asked in a thread while the p2p checks run, so unreachable
    peers and an unreachable coordinator together still take about one ``timeout``.
    """
    hivemind_checks = check_hivemind()
    if all(check.status != "FAIL" for check in hivemind_checks):
        hivemind_checks += check_swarm_module()
    swarm_ok = all(
        check.status != "FAIL" for check in hivemind_checks
    )  # hivemind and vitpeer.peer.core.swarm.dht both import
    checks = [*check_python(), *check_torch(), *hivemind_checks]
    # asked in a thread while the p2p checks run; started only now, so that no two threads import at the same time
    coordinator_checks = (
        in_background(check_coordinator_status, coordinator, timeout) if coordinator and swarm_ok else None
    )
    with adopting_orphans():
        if swarm_ok:
            checks += check_p2p_daemon(timeout)
        checks += check_port("host port", host_port, "0.0.0.0", "--host-port")
        checks += check_port("metrics port", metrics_port, "127.0.0.1", "--metrics-port")
        peers = split_peer_list(initial_peers)
        if peers and not swarm_ok:
            checks.append(Check("initial peers", "FAIL", "not tried: hivemind or vitpeer does not import (see above)"))
        elif peers and any(check.name == "p2p daemon" and check.status == "FAIL" for check in checks):
            checks.append(Check("initial peers", "FAIL", "not tried: the p2p daemon does not start (see above)"))
        elif peers:
            checks += check_initial_peers(peers, timeout)
        checks += check_reachability(peers, client_mode)
    if coordinator and not swarm_ok:
        checks.append(Check("coordinator", "FAIL", "not tried: hivemind or vitpeer does not import (see above)"))
    elif coordinator_checks is not None:
        checks += coordinator_checks(timeout + 5.0)  # already bounded inside; the margin only covers its start
    return checks


def report(checks: list[Check]) -> str:
    """One aligned line per check, then the summary."""
    width = max(len(check.name) for check in checks)
    lines = [f"{check.status:<4}  {check.name:<{width}}  {check.detail}" for check in checks]
    counts = {status: sum(check.status == status for check in checks) for status in ("ok", "warn", "FAIL")}
    summary = f"doctor: {counts['ok']} ok, {counts['warn']} warn, {counts['FAIL']} FAIL"
    if counts["FAIL"]:
        summary += ": fix the FAIL lines above before joining"
    else:
        summary += ": ready to join" + (" (warnings do not stop a run)" if counts["warn"] else "")
    return "\n".join([*lines, summary])


@click.command("doctor", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--initial-peers",
    multiple=True,
    metavar="MADDR",
    envvar="VITPEER_INITIAL_PEERS",
    help="A peer to reach, as join takes it (repeat, or separate with commas/spaces). [env: VITPEER_INITIAL_PEERS]",
)
@click.option(
    "--coordinator",
    metavar="URL",
    envvar="VITPEER_COORDINATOR",
    help="A coordinator's HTTP address (http://HOST:PORT): ask it for its run and peers. [env: VITPEER_COORDINATOR]",
)
@click.option("--host-port", type=click.IntRange(0, 65535), help="The p2p port you will join with: is it free?")
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="The Prometheus port you will use: is it free?")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1.0),
    default=15.0,
    show_default=True,
    help="Seconds to wait for the p2p daemon, for the initial peers and for the coordinator.",
)
@click.option(
    "--client-mode",
    is_flag=True,
    help="You will join with --client-mode (behind NAT): skip the check that peers can dial you back.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON: a list of {name, status, detail}.")
@click.option("-v", "--verbose", is_flag=True, help="Show hivemind's own logs (on stderr).")
def command(
    initial_peers: tuple[str, ...],
    coordinator: str | None,
    host_port: int | None,
    metrics_port: int | None,
    timeout: float,
    client_mode: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Check this host before joining: Python, torch and its GPUs, hivemind's p2p daemon, your ports, the swarm.

    Prints ok / warn / FAIL per check with what to do; exits 1 when something a run needs FAILs (warnings, such as
    training on CPU, do not fail). Give the same --initial-peers or --coordinator and ports you will join with.
    Behind NAT (you reach a public peer from a private address) it tells you to join with --client-mode.

    \b
    Example: vitpeer doctor
    Example: vitpeer doctor --host-port 31337 --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/QmXyz...
    Example: vitpeer doctor --coordinator http://203.0.113.5:8470 --json
    """
    setup_logging(verbose, report=True)
    checks = run_doctor(initial_peers, coordinator, host_port, metrics_port, timeout, client_mode)
    click.echo(json.dumps([asdict(check) for check in checks], indent=2) if as_json else report(checks))
    click.get_current_context().exit(1 if any(check.status == "FAIL" for check in checks) else 0)
