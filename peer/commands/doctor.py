"""``vitpeer doctor``: check this host before joining a swarm, one line per finding and what to do about it.

Each check is a small function returning ``Check`` records: those of this host (Python, torch, GPUs, hivemind's
import, ports) in ``doctor_host``, those of the swarm (the p2p daemon, the initial peers, reachability, the
coordinator) in ``doctor_swarm``. ``run_doctor`` here runs them in a fixed order and the click ``command`` prints them
(or ``--json``) and exits 1 when any of them FAILs. Warnings never fail: a CPU-only host can train, only slowly.

What can hang is bounded by ``--timeout``: the p2p daemon start, the connection to ``--initial-peers`` and the
coordinator's answer (fetched in a thread while the p2p checks run, so both together still take about one timeout).
Every hivemind DHT process started here is stopped on the way out, and with it its p2p daemon (``p2pd``), even when
the start failed half-way: a DHT process that dies leaves its ``p2pd`` orphaned, so while the checks run this process
adopts orphans (Linux "child subreaper") and stops any ``p2pd`` still running at the end.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from vitpeer.peer.commands.doctor_host import (
    Check,
    check_hivemind,
    check_port,
    check_python,
    check_swarm_module,
    check_torch,
)
from vitpeer.peer.commands.doctor_swarm import (
    check_coordinator_status,
    check_initial_peers,
    check_p2p_daemon,
    check_reachability,
)
from vitpeer.peer.core.config import split_peer_list
from vitpeer.peer.core.config.options import setup_logging
from vitpeer.peer.core.runtime.processes import adopting_orphans, in_background


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
