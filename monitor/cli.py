"""``vitpeer monitor``: its command line; the exporter itself is ``run.py``."""

from __future__ import annotations

import click

from vitpeer.peer.core.config.options import (
    INITIAL_PEERS,
    BadInput,
    Flag,
    config_options,
    coordinator_timeout_option,
    join_config,
    quiet_warnings,
    reported,
    setup_logging,
)

RUN_ID = Flag("swarm.run_id", show_default=False)  # no default: the coordinator's or the config's, or refused


@click.command()
@config_options([INITIAL_PEERS])
@click.option(
    "--coordinator",
    metavar="URL",
    envvar="VITPEER_COORDINATOR",
    show_envvar=True,
    help="Or a coordinator's HTTP address (http://HOST:PORT): its peers and run id.",
)
@coordinator_timeout_option
@click.option("--config", "config_file", metavar="FILE", help="The run's YAML, for its run id (or --run-id).")
@config_options([RUN_ID])
@click.option("--addr", default="127.0.0.1", show_default=True, help="Interface of the metrics endpoint.")
@click.option("--port", type=click.IntRange(0, 65535), default=9471, show_default=True, help="Metrics port (0: any).")
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.5),
    default=5.0,
    show_default=True,
    help="Seconds between reads of the peers' records.",
)
@click.option("-v", "--verbose", is_flag=True, help="Show hivemind's own logs.")
def monitor(
    initial_peers: tuple[str, ...],
    coordinator: str | None,
    coordinator_timeout: float,
    config_file: str | None,
    run_id: str | None,
    addr: str,
    port: int,
    poll_interval: float,
    verbose: bool,
) -> None:
    """Serve a swarm's metrics to Prometheus without running a coordinator (reads the peers' signed DHT records).

    \b
    Example: vitpeer monitor --coordinator http://203.0.113.5:8470 --port 9471
    Example: vitpeer monitor --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/Qm... --run-id vitpeer-digits
    """
    quiet_warnings(verbose)
    if not initial_peers and coordinator is None:
        raise BadInput("give --initial-peers or --coordinator: the monitor needs a way into the swarm")
    if coordinator is None and run_id is None and config_file is None:
        raise BadInput("give --run-id (or --config): which run's records to read")
    given = {INITIAL_PEERS.param: initial_peers, RUN_ID.param: run_id}
    with reported():
        config = join_config(config_file, coordinator, given, wait=coordinator_timeout)
    setup_logging(verbose)
    from vitpeer.monitor.run import run_monitor

    with reported():
        run_monitor(config.swarm.run_id, config.swarm.initial_peers, addr, port, poll_interval)
