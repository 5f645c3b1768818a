"""The ``vitpeer`` command: parse flags into a validated ``RunConfig`` and call one run function. No logic here."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from peer.config import ConfigError, RunConfig, load_config

DEFAULT_CONFIG = "digits_tiny"

# command-line option -> dotted config key; a flag left unset keeps the file's (or the default) value
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
}


def setup_logging(verbose: bool) -> None:
    """Our progress lines on stdout; hivemind and Lightning only when they warn (or everything with --verbose)."""
    if not verbose:  # before importing hivemind, whose imports already warn
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_root_logger")  # hivemind's records go through the root logger's handler
    ours = logging.getLogger("peer")
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


def build_config(config_file: str | None, options: dict[str, Any], mapping: dict[str, str]) -> RunConfig:
    """File values overridden by the flags that were given; a bad value exits with the key, value and the rule."""
    overrides = {}
    for option, key in mapping.items():
        value = options.get(option)
        if value is None or value == ():
            continue
        overrides[key] = list(value) if isinstance(value, tuple) else value
    try:
        return load_config(config_file or DEFAULT_CONFIG, overrides)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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
@click.option("--run-id", help="hivemind run id, used exactly as given; all peers of a run share it.")
@click.option("--host-port", type=int, help="TCP port to listen on (0: any free port). Open it to the internet.")
@click.option("--host-maddr", multiple=True, metavar="MADDR", help="Listen multiaddr instead of all interfaces.")
@click.option("--announce-ip", help="Public IP others should dial (behind NAT with a forwarded --host-port).")
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), help="Key file: a stable peer id.")
@click.option("--client-mode/--no-client-mode", default=None, help="Accept no incoming connections (firewalled).")
@click.option("--auto-relay/--no-auto-relay", default=None, help="Be reachable through relays (behind NAT).")
@click.option("--target-batch-size", type=int, help="Samples the swarm gathers per optimizer step.")
@click.option("--batch-size", type=int, help="Samples per local step on this peer.")
@click.option("--max-steps", type=int, help="Swarm steps to train.")
@click.option("--matchmaking-time", type=float, help="Seconds to gather an averaging group.")
@click.option("--averaging-timeout", type=float, help="Seconds before an averaging round is given up.")
@click.option("--load-state-timeout", type=float, help="Deadline for downloading the swarm's state.")
@click.option("--compression", type=click.Choice(["none", "fp16", "8bit"]), help="Gradient compression.")
@click.option("--local-updates/--no-local-updates", default=None, help="Step locally, average parameters only.")
@click.option("--overlap/--no-overlap", default=None, help="Average in the background while computing.")
@click.option("--model", help="timm model name, e.g. vit_base_patch32_224.")
@click.option("--pretrained/--no-pretrained", default=None, help="Start from the hub's weights (downloads).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Local data directory.")
@click.option("--download/--no-download", default=None, help="Allow downloading the data set.")
@click.option("--precision", type=click.Choice(["32", "16-mixed", "bf16-mixed"]), help="Numerics.")
@click.option("--accelerator", type=click.Choice(["auto", "cpu", "gpu"]), help="Device.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), help="Run directory.")
@click.option("--resume", type=click.Path(dir_okay=False, path_type=Path), help="Lightning checkpoint to resume.")
@click.option("--seed", type=int, help="Seed of model initialisation (data order differs per peer anyway).")
@click.option("-v", "--verbose", is_flag=True, help="Show hivemind's and Lightning's own logs.")
def join(config_file: str | None, verbose: bool, **options: Any) -> None:
    """Train together with a swarm (or start one).

    \b
    Example, first host:   vitpeer join --host-port 31337
    Example, other hosts:  vitpeer join --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/QmXyz...
    """
    setup_logging(verbose)
    config = build_config(config_file, options, JOIN_OPTIONS)
    from peer.join import run_join

    try:
        run_join(config)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err


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


if __name__ == "__main__":
    main()
