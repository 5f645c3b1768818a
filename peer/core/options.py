"""What every command line shares: flags into a validated ``RunConfig``, and one ``Error:`` line for bad input.

The peer's commands (``vitpeer.peer.commands.cli``), the coordinator's and the monitor's build on this module; it
imports no Lightning, timm or torch, so a refusal is printed before any of them loads.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from vitpeer.peer.core.config import ConfigError, RunConfig, load_config

DEFAULT_CONFIG = "digits_tiny"
OUR_LOGGER = "vitpeer"  # our modules' log records are our progress lines, on stdout

# command-line option -> dotted config key; a flag left unset keeps the file's (or the default) value
TRAINING_OPTIONS: dict[str, str] = {  # what join and train share
    "batch_size": "data.batch_size",
    "data_dir": "data.data_dir",
    "download": "data.download",
    "model": "model.name",
    "pretrained": "model.pretrained",
    "max_steps": "trainer.max_steps",
    "precision": "trainer.precision",
    "accelerator": "trainer.accelerator",
    "output_dir": "trainer.output_dir",
    "resume": "trainer.resume",
    "seed": "trainer.seed",
    "schedule": "optim.schedule",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "save_top_k": "trainer.save_top_k",
    "progress_bar": "trainer.progress_bar",
}
JOIN_OPTIONS: dict[str, str] = {
    "initial_peers": "swarm.initial_peers",
    "run_id": "swarm.run_id",
    "host_port": "swarm.host_port",
    "host_maddr": "swarm.host_maddrs",
    "announce_ip": "swarm.announce_ip",
    "identity": "swarm.identity_path",
    "client_mode": "swarm.client_mode",
    "auto_relay": "swarm.use_auto_relay",
    "target_batch_size": "swarm.target_batch_size",
    "matchmaking_time": "swarm.matchmaking_time",
    "averaging_timeout": "swarm.averaging_timeout",
    "load_state_timeout": "swarm.load_state_timeout",
    "compression": "swarm.compression",
    "local_updates": "swarm.local_updates",
    "overlap": "swarm.overlap",
    "average_state_every": "swarm.average_state_every",
    **TRAINING_OPTIONS,
    "metrics_port": "monitor.port",
    "metrics_addr": "monitor.addr",
    "local_strategy": "parallel.strategy",
    "devices": "parallel.devices",
    "fsdp_sharding": "parallel.fsdp_sharding",
    "fsdp_min_params": "parallel.fsdp_min_params",
}
TRAIN_OPTIONS: dict[str, str] = {
    **TRAINING_OPTIONS,
    "strategy": "parallel.strategy",
    "devices": "parallel.devices",
    "num_nodes": "parallel.num_nodes",
    "fsdp_sharding": "parallel.fsdp_sharding",
    "fsdp_min_params": "parallel.fsdp_min_params",
    "early_stopping_patience": "trainer.early_stopping_patience",
    "load_best_at_end": "trainer.load_best_at_end",
}


COORDINATOR_WAIT = 60.0
"""Default seconds ``--coordinator-timeout``: how long join and monitor retry a coordinator that does not answer."""


class BadInput(click.ClickException):
    """What the user typed or pointed at is wrong: one line on stderr, exit code 2 (the world's failures exit 1)."""

    exit_code = 2


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Map what a command raises to its exit: a ``ConfigError`` from any depth (config, pre-flight, run) or a
    missing file is the user's input, exit 2; other ``ValueError`` and ``RuntimeError`` (peers or coordinator that do
    not answer, a daemon that does not start) are the world's, exit 1. Either way one ``Error:`` line, no traceback."""
    try:
        yield
    except (ConfigError, FileNotFoundError) as err:
        raise BadInput(str(err)) from None
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None


def training_options(command):
    """The model, data and trainer flags ``join`` and ``train`` share (``TRAINING_OPTIONS``)."""
    options = [
        click.option("--batch-size", type=int, help="Samples per local step (per device)."),
        click.option("--max-steps", type=int, help="Optimizer steps to train (in a swarm: swarm steps)."),
        click.option("--model", help="timm model name, e.g. vit_base_patch32_224."),
        click.option("--pretrained/--no-pretrained", default=None, help="Start from the hub's weights (downloads)."),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Local data directory."),
        click.option("--download/--no-download", default=None, help="Allow downloading the data set."),
        click.option("--precision", type=click.Choice(["32", "16-mixed", "bf16-mixed"]), help="Numerics."),
        click.option("--accelerator", type=click.Choice(["auto", "cpu", "gpu"]), help="Device."),
        click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), help="Run directory."),
        click.option("--resume", type=click.Path(dir_okay=False, path_type=Path), help="Lightning checkpoint."),
        click.option("--seed", type=int, help="Seed of model initialisation (and of data order, outside a swarm)."),
        click.option("--schedule", type=click.Choice(["cosine", "onecycle", "constant"]), help="LR schedule."),
        click.option(
            "--accumulate-grad-batches", type=int, help="Local steps per optimizer step (train; a swarm refuses it)."
        ),
        click.option("--save-top-k", type=int, help="Best checkpoints by val/loss to keep (0: only last.ckpt)."),
        click.option("--progress-bar/--no-progress-bar", default=None, help="Live bar (default: on a terminal)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def fsdp_options(command):
    """FSDP's knobs, for ``train --strategy fsdp`` and ``join --local-strategy fsdp``."""
    command = click.option("--fsdp-min-params", type=int, help="FSDP auto-wrap: parameters per unit at least.")(command)
    sharding = click.Choice(["full_shard", "shard_grad_op"])
    return click.option("--fsdp-sharding", type=sharding, help="FSDP: free gathered parameters after forward?")(command)


coordinator_timeout_option = click.option(
    "--coordinator-timeout",
    type=click.FloatRange(min=0),
    default=COORDINATOR_WAIT,
    show_default=True,
    metavar="SECONDS",
    help="How long to retry a coordinator that does not answer (it may be starting) before giving up.",
)
"""``--coordinator-timeout``, for every command that can start from ``--coordinator`` (join, monitor)."""


def setup_logging(verbose: bool) -> None:
    """Our progress lines on stdout; hivemind and Lightning only when they warn (or everything with --verbose)."""
    if not verbose:  # before importing hivemind, whose imports already warn
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # a run that ends before its first validation has no val/loss yet: last.ckpt is written all the same
        warnings.filterwarnings("ignore", message=r".*could not find the monitored key.*")
        # the run directory already holds config.yaml when the CSV logger opens it
        warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists and is not empty.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    import pytorch_lightning  # noqa: F401  its import sets its loggers to INFO: import it before setting them
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_root_logger")  # hivemind's records go through the root logger's handler
    ours = logging.getLogger(OUR_LOGGER)
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s vitpeer %(message)s", datefmt="%H:%M:%S"))
        ours.addHandler(handler)
        ours.propagate = False
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("hivemind", "pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # hivemind's "Task was destroyed but it is pending" at exit is asyncio noise, not a user's problem
    logging.getLogger("asyncio").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def build_config(
    config_file: str | None, options: dict[str, Any], mapping: dict[str, str], text: str | None = None, source: str = ""
) -> RunConfig:
    """File values (or YAML ``text``) overridden by the flags that were given; a bad value exits naming the key,
    the value and the rule."""
    overrides = {}
    for option, key in mapping.items():
        value = options.get(option)
        if value is None or value == ():
            continue
        overrides[key] = list(value) if isinstance(value, tuple) else value
    try:
        if text is not None:
            return load_config(None, overrides, text=text, source=source)
        return load_config(config_file or DEFAULT_CONFIG, overrides)
    except ConfigError as err:
        raise BadInput(str(err)) from None


def join_config(
    config_file: str | None, coordinator: str | None, options: dict[str, Any], wait: float = COORDINATOR_WAIT
) -> RunConfig:
    """The peer's config: from --config, or from the coordinator's /config (retried for ``wait`` s while it does
    not answer); initial peers from the coordinator unless --initial-peers is given."""
    if coordinator is None:
        return build_config(config_file, options, JOIN_OPTIONS)
    from vitpeer.peer.core.swarm import coordinator_get  # imports hivemind: only with a coordinator

    try:
        shared = coordinator_get(coordinator, "/config", wait=wait)
        if not options.get("initial_peers"):
            peers = coordinator_get(coordinator, "/initial-peers", wait=wait)
            options = {**options, "initial_peers": tuple(peers.split())}
    except ValueError as err:  # not an http:// address: the user's
        raise BadInput(str(err)) from None
    except RuntimeError as err:  # no answer, or an HTTP error: the coordinator's
        raise click.ClickException(str(err)) from None
    if config_file is None:
        return build_config(None, options, JOIN_OPTIONS, text=shared, source=f"{coordinator}/config")
    config = build_config(config_file, options, JOIN_OPTIONS)
    theirs = load_config(None, text=shared, source=coordinator).swarm.run_id
    if config.swarm.run_id != theirs:
        raise BadInput(
            f"swarm.run_id = {config.swarm.run_id!r} but the coordinator runs {theirs!r}; "
            f"pass --run-id {theirs}, or leave out --config to use the coordinator's"
        )
    return config
