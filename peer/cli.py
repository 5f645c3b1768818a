"""The ``vitpeer`` command: parse flags into a validated ``RunConfig`` and call one run function. No logic here."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from peer import doctor, preflight, profile
from peer.config import ConfigError, RunConfig, load_config, validated

DEFAULT_CONFIG = "digits_tiny"
OUR_PACKAGES = ("peer", "coordinator", "monitor")  # their log records are our progress lines, on stdout

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


class Commands(click.Group):
    """``vitpeer``'s group: a flag click cannot parse (wrong type, unknown option) is one ``Error:`` line with exit
    code 2 as well, instead of click's usage banner."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # a bare group: click shows its help, keep that
                raise
            where = err.ctx.command_path if err.ctx is not None else ctx.command_path
            raise BadInput(f"{err.format_message()} (see {where} --help)") from None


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
    for package in OUR_PACKAGES:
        ours = logging.getLogger(package)
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
    from peer.swarm import coordinator_get

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


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="vitpeer")
def main() -> None:
    """vitpeer: train vision transformers together over the internet.

    \b
    Examples:
    Start a local two-peer demo:          vitpeer demo
    Start a swarm on this host:           vitpeer join --config cifar10_vit_b32_hivemind
    Join a swarm (paste the printed line): vitpeer join --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/Qm...
    """


@main.command()
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    help=f"Experiment YAML (a path or a name in configs/). [default: {DEFAULT_CONFIG}]",
)
@click.option(
    "--initial-peers",
    multiple=True,
    metavar="MADDR",
    envvar="VITPEER_INITIAL_PEERS",
    help="A peer already in the swarm (repeat, or separate with commas/spaces). None: start a new swarm. "
    "[env: VITPEER_INITIAL_PEERS]",
)
@click.option(
    "--coordinator",
    metavar="URL",
    envvar="VITPEER_COORDINATOR",
    help="A coordinator's HTTP address (http://HOST:PORT): initial peers, and the run's config unless --config. "
    "[env: VITPEER_COORDINATOR]",
)
@coordinator_timeout_option
@click.option("--run-id", help="hivemind run id, used exactly as given; all peers of a run share it.")
@click.option("--host-port", type=int, help="TCP port to listen on (0: any free port). Open it to the internet.")
@click.option("--host-maddr", multiple=True, metavar="MADDR", help="Listen multiaddr instead of all interfaces.")
@click.option("--announce-ip", help="Public IP others should dial (behind NAT with a forwarded --host-port).")
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), help="Key file: a stable peer id.")
@click.option("--client-mode/--no-client-mode", default=None, help="Accept no incoming connections (firewalled).")
@click.option("--auto-relay/--no-auto-relay", default=None, help="Be reachable through relays (behind NAT).")
@click.option("--target-batch-size", type=int, help="Samples the swarm gathers per optimizer step.")
@click.option("--matchmaking-time", type=float, help="Seconds to gather an averaging group.")
@click.option("--averaging-timeout", type=float, help="Seconds before an averaging round is given up.")
@click.option("--load-state-timeout", type=float, help="Deadline for downloading the swarm's state.")
@click.option("--compression", type=click.Choice(["none", "fp16", "8bit"]), help="Gradient compression.")
@click.option("--local-updates/--no-local-updates", default=None, help="Step locally, average parameters only.")
@click.option("--overlap/--no-overlap", default=None, help="Average in the background while computing.")
@click.option("--average-state-every", type=int, help="Swarm steps between state-averaging rounds. [default: 1]")
@click.option(
    "--local-strategy", type=click.Choice(["single", "ddp", "fsdp"]), help="Several devices as one peer: ddp."
)
@click.option("--devices", type=int, help="Devices (processes) of this host in the peer. [default: 1]")
@fsdp_options
@training_options
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this port (0: any). [default: off]")
@click.option("--metrics-addr", help="Interface of the metrics endpoint. [default: 127.0.0.1]")
@click.option("-v", "--verbose", is_flag=True, help="Show hivemind's and Lightning's own logs.")
def join(
    config_file: str | None, coordinator: str | None, coordinator_timeout: float, verbose: bool, **options: Any
) -> None:
    """Train together with a swarm (or start one).

    \b
    Example, through a coordinator: vitpeer join --coordinator http://203.0.113.5:8470
    Example, first host:            vitpeer join --host-port 31337
    Example, other hosts:           vitpeer join --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/QmXyz...
    """
    setup_logging(verbose)
    with reported():
        config = join_config(config_file, coordinator, options, wait=coordinator_timeout)
        preflight.check_run(config, swarm=True)  # before anything is written or started
        from peer.join import run_join

        run_join(config)


@main.command()
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
    from coordinator.config import CoordinatorConfig

    given = {key: value for key, value in options.items() if value is not None and value != ()}
    with reported():
        coord = validated(CoordinatorConfig, given, "command line")
        preflight.check_coordinator(config, coord)
        from coordinator.run import run_coordinator

        run_coordinator(config, coord)


@main.command()
@click.option("--config", "config_file", metavar="FILE", help=f"Experiment YAML. [default: {DEFAULT_CONFIG}]")
@click.option("--strategy", type=click.Choice(["single", "ddp", "fsdp"]), help="How ranks share the work.")
@click.option("--devices", type=int, help="Processes (devices) per node.")
@click.option("--num-nodes", type=int, help="Nodes, each started with this command.")
@fsdp_options
@training_options
@click.option("--early-stopping-patience", type=int, help="Stop after this many validations without a better loss.")
@click.option("--load-best-at-end/--last-at-end", default=None, help="Test and export the best or the last weights.")
@click.option("-v", "--verbose", is_flag=True, help="Show Lightning's own logs.")
def train(config_file: str | None, verbose: bool, **options: Any) -> None:
    """Train without a swarm: one device, or DDP / FSDP over the devices of one or more nodes.

    \b
    Example, 2 GPUs with FSDP:  vitpeer train --config cifar10_vit_b32_fsdp --devices 2
    Example, 2 nodes with DDP, on node i (0, 1):
      MASTER_ADDR=node0 MASTER_PORT=29500 NODE_RANK=i vitpeer train --config cifar10_vit_b32_ddp --num-nodes 2
    Example, torchrun:          torchrun --nproc-per-node 8 -m peer.cli train --config imagenet_vit_l16_fsdp --devices 8
    """
    setup_logging(verbose)
    config = build_config(config_file, options, TRAIN_OPTIONS)
    with reported():
        preflight.check_run(config, swarm=False)  # before anything is written or started
        from peer.train import run_train

        run_train(config)


@main.command()
@click.option(
    "--initial-peers", multiple=True, metavar="MADDR", envvar="VITPEER_INITIAL_PEERS", help="A peer in the swarm."
)
@click.option("--coordinator", metavar="URL", envvar="VITPEER_COORDINATOR", help="Or a coordinator: peers and run id.")
@coordinator_timeout_option
@click.option("--config", "config_file", metavar="FILE", help="The run's YAML, for its run id (or --run-id).")
@click.option("--run-id", help="The run to watch (default: the coordinator's or the config's).")
@click.option("--addr", default="127.0.0.1", show_default=True, help="Interface of the metrics endpoint.")
@click.option("--port", type=click.IntRange(0, 65535), default=9471, show_default=True, help="Metrics port (0: any).")
@click.option("--poll-interval", type=click.FloatRange(min=0.5), default=5.0, show_default=True, help="Seconds.")
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
    setup_logging(verbose)
    if not initial_peers and coordinator is None:
        raise BadInput("give --initial-peers or --coordinator: the monitor needs a way into the swarm")
    if coordinator is None and run_id is None and config_file is None:
        raise BadInput("give --run-id (or --config): which run's records to read")
    given = {"initial_peers": initial_peers, "run_id": run_id}
    with reported():
        config = join_config(config_file, coordinator, given, wait=coordinator_timeout)
        from monitor.run import run_monitor

        run_monitor(config.swarm.run_id, config.swarm.initial_peers, addr, port, poll_interval)


@main.command()
@click.option("--peers", type=click.IntRange(1, 16), default=2, show_default=True, help="Peers in the local swarm.")
@click.option("--config", "config_file", default=DEFAULT_CONFIG, show_default=True, help="Experiment YAML.")
@click.option("--max-steps", type=int, help="Swarm steps to train (default: the config's).")
@click.option(
    "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs/demo"), show_default=True
)
def demo(peers: int, config_file: str, max_steps: int | None, output_dir: Path) -> None:
    """A local swarm on 127.0.0.1: N peers train the embedded digits set together, then report test accuracy.

    \b
    Example: vitpeer demo --peers 2
    """
    setup_logging(verbose=False)
    build_config(config_file, {}, {})  # fail fast on a bad file, before any process starts
    from peer.demo import run_demo

    accuracy = run_demo(peers, config_file, output_dir, max_steps)
    if accuracy is None:
        sys.exit(1)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_file", metavar="FILE", help="The run's YAML. [default: config.yaml beside it]")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True, help="Held-out split.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate(checkpoint: Path, config_file: str | None, split: str, as_json: bool) -> None:
    """Test loss, accuracy and a per-class report of a checkpoint (.ckpt or .safetensors) on a held-out split.

    \b
    Example: vitpeer evaluate outputs/digits_tiny/checkpoints/last.ckpt
    """
    setup_logging(verbose=False)
    from peer.evaluate import run_config_beside, run_evaluate

    with reported():
        preflight.check_checkpoint(checkpoint, "CHECKPOINT")
        config = build_config(config_file or str(run_config_beside(checkpoint)), {}, {})
        results = run_evaluate(checkpoint, config, split)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    click.echo(f"{checkpoint} on the {split} split ({results['samples']} images):")
    click.echo(f"loss {results['loss']:.4f}   accuracy {results['accuracy']:.4f}\n")
    click.echo(results["report"])


@main.command()
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
def plot(run_dir: Path) -> None:
    """Draw a run's loss, accuracy and learning-rate curves into RUN_DIR/plots/.

    RUN_DIR is a run's output directory (the config's trainer.output_dir), which holds history/history.json. It
    works while the run goes on, too: the history is rewritten at every validation.

    \b
    Example: vitpeer plot outputs/digits_tiny
    """
    from peer.history import HISTORY_DIR, plot_history

    try:
        written = plot_history(run_dir)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    if not written:
        raise click.ClickException(f"{run_dir / HISTORY_DIR / 'history.json'} has no metrics to plot yet")
    for path in written:
        click.echo(str(path))


# commands that need no run config: their own modules, with their own options
main.add_command(profile.command)
main.add_command(doctor.command)

if __name__ == "__main__":
    main()
