"""The peer's command lines: ``join``, ``train``, ``demo``, ``evaluate``, ``plot`` (and ``doctor`` and ``profile``,
defined beside what they run). Each parses flags into a validated config, checks it, then imports and calls one run
function: nothing heavy is imported before the input is known to be good."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vitpeer.peer.commands import doctor, flops
from vitpeer.peer.core.config import RunConfig, preflight
from vitpeer.peer.core.config.options import (
    DEFAULT_CONFIG,
    DEMO_CONFIG,
    FLAGS_OVER_FILE,
    JOIN_FLAGS,
    TRAIN_FLAGS,
    build_config,
    config_file_option,
    config_options,
    coordinator_timeout_option,
    join_config,
    quiet_warnings,
    reported,
    setup_logging,
)

if TYPE_CHECKING:
    import pytorch_lightning as pl


@click.command(epilog=FLAGS_OVER_FILE)
@config_file_option(DEMO_CONFIG)
@click.option(
    "--coordinator",
    metavar="URL",
    envvar="VITPEER_COORDINATOR",
    show_envvar=True,
    help="A coordinator's HTTP address (http://HOST:PORT): initial peers, and the run's config unless --config.",
)
@coordinator_timeout_option
@config_options(JOIN_FLAGS)
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
    join_steps(config_file, coordinator, coordinator_timeout, verbose, options)


def join_steps(
    config_file: str | None,
    coordinator: str | None,
    coordinator_timeout: float,
    verbose: bool,
    options: dict[str, Any],
    callbacks: Callable[[RunConfig], Sequence[pl.Callback]] | None = None,
) -> None:
    """What ``vitpeer join`` does with its parsed flags; ``callbacks(config)`` (``commands.extend``) adds Lightning
    callbacks to the run through ``run_join``'s public hook."""
    quiet_warnings(verbose)
    with reported():
        config = join_config(config_file, coordinator, options, wait=coordinator_timeout)
        preflight.check_run(config, swarm=True)  # before anything is written, started or imported
    setup_logging(verbose)
    from vitpeer.peer.commands.join import run_join

    with reported():
        run_join(config, extra_callbacks=callbacks(config) if callbacks is not None else ())


@click.command(epilog=FLAGS_OVER_FILE)
@config_file_option(DEFAULT_CONFIG)
@config_options(TRAIN_FLAGS)
@click.option("-v", "--verbose", is_flag=True, help="Show Lightning's own logs.")
def train(config_file: str | None, verbose: bool, **options: Any) -> None:
    """Train without a swarm: one device, or DDP / FSDP over the devices of one or more nodes.

    \b
    Example, 2 GPUs with FSDP:  vitpeer train --config cifar10_vit_b32_fsdp --devices 2
    Example, 2 nodes with DDP, on node i (0, 1):
      MASTER_ADDR=node0 MASTER_PORT=29500 NODE_RANK=i vitpeer train --config cifar10_vit_b32_ddp --num-nodes 2
    Example, torchrun:
      torchrun --nproc-per-node 8 -m vitpeer.peer.cli train --config imagenet_vit_l16_fsdp --devices 8
    """
    config = build_config(config_file, options, TRAIN_FLAGS)
    with reported():
        preflight.check_run(config, swarm=False)  # before anything is written, started or imported
    setup_logging(verbose)
    from vitpeer.peer.commands.train import run_train

    with reported():
        run_train(config)


@click.command()
@click.option("--peers", type=click.IntRange(1, 16), default=2, show_default=True, help="Peers in the local swarm.")
@click.option("--config", "config_file", default=DEMO_CONFIG, show_default=True, help="Experiment YAML.")
@click.option("--max-steps", type=int, help="Swarm steps to train (default: the config's).")
@click.option(
    "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs/demo"), show_default=True
)
def demo(peers: int, config_file: str, max_steps: int | None, output_dir: Path) -> None:
    """A local swarm on 127.0.0.1: N peers train the embedded digits set together, then report test accuracy.

    A coordinator watches them: its live page (URL printed at the start) shows the swarm while it trains.

    \b
    Example: vitpeer demo --peers 2
    """
    build_config(config_file, {}, ())  # fail fast on a bad file, before any process starts
    setup_logging(verbose=False)
    from vitpeer.peer.commands.demo import run_demo

    accuracy = run_demo(peers, config_file, output_dir, max_steps, coordinator=True)
    if accuracy is None:
        sys.exit(1)


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_file", metavar="FILE", help="The run's YAML. [default: config.yaml beside it]")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True, help="Held-out split.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate(checkpoint: Path, config_file: str | None, split: str, as_json: bool) -> None:
    """Test loss, accuracy and a per-class report of a checkpoint (.ckpt or .safetensors) on a held-out split.

    \b
    Example: vitpeer evaluate outputs/digits_tiny/checkpoints/last.ckpt
    """
    with reported():
        preflight.check_checkpoint(checkpoint, "CHECKPOINT")  # before torch and Lightning are imported
    setup_logging(verbose=False)
    from vitpeer.peer.commands.evaluate import run_config_beside, run_evaluate

    with reported():
        config = build_config(config_file or str(run_config_beside(checkpoint)), {}, ())
        results = run_evaluate(checkpoint, config, split)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    click.echo(f"{checkpoint} on the {split} split ({results['samples']} images):")
    click.echo(f"loss {results['loss']:.4f}   accuracy {results['accuracy']:.4f}\n")
    click.echo(results["report"])


@click.command()
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
def plot(run_dir: Path) -> None:
    """Draw a run's loss, accuracy and learning-rate curves into RUN_DIR/plots/.

    RUN_DIR is a run's output directory (the config's trainer.output_dir), which holds history/history.json. It
    works while the run goes on, too: the history is rewritten at every validation.

    \b
    Example: vitpeer plot outputs/digits_tiny
    """
    from vitpeer.peer.core.runtime.history import HISTORY_DIR, plot_history

    try:
        written = plot_history(run_dir)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    if not written:
        raise click.ClickException(f"{run_dir / HISTORY_DIR / 'history.json'} has no metrics to plot yet")
    for path in written:
        click.echo(str(path))


profile = flops.command
doctor = doctor.command
