"""``vitpeer coordinator``: its command line; the run itself is ``run.py``."""

from __future__ import annotations

from typing import Any

import click

from vitpeer.coordinator.config import CoordinatorConfig, check_coordinator
from vitpeer.peer.core.config import validated
from vitpeer.peer.core.config.options import (
    DEMO_CONFIG,
    Flag,
    build_config,
    config_file_option,
    config_options,
    overrides,
    reported,
    setup_logging,
)

RUN_FLAGS = (Flag("swarm.run_id", show_default=False),)
"""What the coordinator changes in the run's config file; its default is the file's."""
COORDINATOR_FLAGS = (
    Flag("state_dir"),
    Flag("host_port"),
    Flag("host_maddrs", "host-maddr", metavar="MADDR"),
    Flag("announce_ip"),
    Flag("http_host"),
    Flag("http_names", "http-name", metavar="NAME"),
    Flag("http_port"),
    Flag("checkpoint_every_steps"),
    Flag("checkpoint_every_minutes"),
    Flag("keep_last"),
    Flag("download_timeout"),
    Flag("eval_batches"),
)
"""The coordinator's own settings (``CoordinatorConfig``), set on the command line only."""


@click.command()
@config_file_option(DEMO_CONFIG)
@config_options(RUN_FLAGS)
@config_options(COORDINATOR_FLAGS, CoordinatorConfig)
@click.option("-v", "--verbose", is_flag=True, help="Show hivemind's own logs.")
def coordinator(config_file: str | None, verbose: bool, **options: Any) -> None:
    """Seed a swarm, watch it, checkpoint it, and keep its state when every volunteer has left.

    \b
    Example: vitpeer coordinator --config cifar10_vit_b32_hivemind --state-dir /srv/vitpeer --host-port 31337
    Volunteers then run: vitpeer join --coordinator http://THIS_HOST:8470
    """
    config = build_config(config_file, options, RUN_FLAGS, default=DEMO_CONFIG)
    with reported():
        coord = validated(CoordinatorConfig, overrides(options, COORDINATOR_FLAGS), "command line")
        check_coordinator(config, coord)  # before anything is written, started or imported
    setup_logging(verbose)
    from vitpeer.coordinator.run import run_coordinator

    with reported():
        run_coordinator(config, coord)
