"""``vitpeer coordinator``: its command line; the run itself is ``run.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vitpeer.peer.core.config import validated
from vitpeer.peer.core.options import DEFAULT_CONFIG, build_config, reported, setup_logging


@click.command()
@click.option("--config", "config_file", metavar="FILE", help=f"The run's experiment YAML. [default: {DEFAULT_CONFIG}]")
@click.option("--run-id", help="hivemind run id (default: the config's).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Identity key, checkpoints, best export, metrics history. [default: coordinator-state]",
)
@click.option("--host-port", type=int, help="Fixed DHT port, open to the internet. [default: 31337]")
@click.option("--host-maddr", "host_maddrs", multiple=True, metavar="MADDR", help="Listen multiaddr instead.")
@click.option("--announce-ip", help="Public IP to announce (behind NAT with --host-port forwarded).")
@click.option("--http-host", help="Interface of the HTTP API; 0.0.0.0 to let volunteers reach it. [default: 127.0.0.1]")
@click.option("--http-port", type=int, help="Port of the HTTP API (0: any). [default: 8470]")
@click.option("--checkpoint-every-steps", type=int, help="Checkpoint every N swarm steps. [default: 50]")
@click.option("--checkpoint-every-minutes", type=float, help="... and every T minutes. [default: 30]")
@click.option("--keep-last", type=int, help="Newest checkpoints to keep, besides the best. [default: 3]")
@click.option("--download-timeout", type=float, help="Deadline of one state download, s. [default: 120]")
@click.option("--eval-batches", type=int, help="Validation batches per checkpoint. [default: all]")
@click.option("-v", "--verbose", is_flag=True, help="Show hivemind's own logs.")
def coordinator(config_file: str | None, run_id: str | None, verbose: bool, **options: Any) -> None:
    """Seed a swarm, watch it, checkpoint it, and keep its state when every volunteer has left.

    \b
    Example: vitpeer coordinator --config cifar10_vit_b32_hivemind --state-dir /srv/vitpeer --host-port 31337
    Volunteers then run: vitpeer join --coordinator http://THIS_HOST:8470
    """
    setup_logging(verbose)
    config = build_config(config_file, {"run_id": run_id}, {"run_id": "swarm.run_id"})
    from vitpeer.coordinator.config import CoordinatorConfig, check_coordinator

    given = {key: value for key, value in options.items() if value is not None and value != ()}
    with reported():
        coord = validated(CoordinatorConfig, given, "command line")
        check_coordinator(config, coord)
        from vitpeer.coordinator.run import run_coordinator

        run_coordinator(config, coord)
