"""The real ``vitpeer join`` command line with Lightning callbacks of one's own, through ``run_join``'s public hook
(``extra_callbacks``): how a benchmark times a peer and a test plays a faulty one without replacing any function.

    python -m benchmarks.utilisation join --config digits_tiny ...   # ``vitpeer join ...`` with a compute clock

The arguments are parsed by the ``join`` command's own options (same flags, YAML file, coordinator, pre-flight checks,
errors and exit codes); only the callbacks are added, after the run's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import click
import pytorch_lightning as pl

from vitpeer.peer.commands import cli
from vitpeer.peer.core.config import RunConfig


def join_with_callbacks(args: Sequence[str], callbacks: Callable[[RunConfig], Sequence[pl.Callback]]) -> None:
    """Run ``vitpeer join ARGS`` (``args`` without the word ``join``) with ``callbacks(config)`` added; exits as the
    command does."""
    command = click.Command("join", params=cli.join.params, callback=partial(_join, callbacks))
    command.main(list(args), prog_name="vitpeer join")


def _join(
    callbacks: Callable[[RunConfig], Sequence[pl.Callback]],
    config_file: str | None,
    coordinator: str | None,
    coordinator_timeout: float,
    verbose: bool,
    **options: Any,
) -> None:
    cli.join_steps(config_file, coordinator, coordinator_timeout, verbose, options, callbacks)
