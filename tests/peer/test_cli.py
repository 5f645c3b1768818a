"""The command line: every command has --help with an example, and its whole --help is kept as a snapshot
(``tests/peer/snapshots/help/``; to rewrite them after a change you mean:
``VITPEER_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/peer/test_cli.py -k snapshot``). The flags that set config
fields are generated from the fields; bad input exits non-zero with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from vitpeer.coordinator.cli import COORDINATOR_FLAGS, coordinator
from vitpeer.coordinator.config import CoordinatorConfig
from vitpeer.peer.cli import main
from vitpeer.peer.commands.cli import join, train
from vitpeer.peer.core.config import RunConfig
from vitpeer.peer.core.config.options import JOIN_FLAGS, TRAIN_FLAGS, build_config, config_field

PEER_ID = "12D3KooWMDNVJKmcbMXyCtbGCidASwAV1xnjExXHgsbYsDdHkANH"  # a valid peer id nobody runs


@pytest.mark.parametrize(
    "command",
    [[], ["join"], ["demo"], ["coordinator"], ["monitor"]],
    ids=["vitpeer", "join", "demo", "coordinator", "monitor"],
)
def test_help_has_an_example(command: list[str]):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_join_help_lists_the_swarm_options():
    output = CliRunner().invoke(main, ["join", "--help"]).output
    options = ("--initial-peers", "--run-id", "--host-port", "--announce-ip", "--target-batch-size", "--max-steps")
    for option in (*options, "--coordinator-timeout"):
        assert option in output


def test_bad_value_exits_with_key_and_value():
    result = CliRunner().invoke(main, ["join", "--batch-size", "0"])
    assert result.exit_code == 2
    assert "data.batch_size = 0" in result.output


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "vitpeer.peer.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "join" in result.stdout


@pytest.mark.parametrize(
    "args, says",
    [
        ([], "give --initial-peers or --coordinator"),
        (["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmX"], "give --run-id (or --config)"),
        (["--run-id", "x", "--initial-peers", "127.0.0.1:31337"], "is not a peer multiaddr"),
    ],
)
def test_monitor_refuses_what_it_cannot_watch(args: list[str], says: str):
    result = CliRunner().invoke(main, ["monitor", *args])
    assert result.exit_code == 2 and says in result.output, result.output


def test_join_metrics_port_is_validated():
    result = CliRunner().invoke(main, ["join", "--metrics-port", "70000"])
    assert result.exit_code == 2 and "monitor.port = 70000" in result.output, result.output


# --- options generated from the typed config ------------------------------------------------------------------------


def parsed(command: click.Command, args: list[str]) -> dict[str, Any]:
    """What click hands ``command`` for ``args``, without running it (under the ``vitpeer`` group's context, whose
    settings the subcommands inherit)."""
    group = main.make_context("vitpeer", [command.name])
    with command.make_context(command.name, args, parent=group) as ctx:
        return ctx.params


def test_a_flag_left_out_keeps_the_files_value_and_a_given_flag_wins(tmp_path: Path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "data: {batch_size: 7}\nmodel: {pretrained: true}\ntrainer: {seed: 3, load_best_at_end: true}\n"
        "swarm: {initial_peers: []}\n"
    )
    params = parsed(train, ["--config", str(config), "--seed", "5", "--no-pretrained", "--last-at-end"])
    resolved = build_config(params["config_file"], params, TRAIN_FLAGS)
    assert resolved.data.batch_size == 7 and resolved.trainer.seed == 5  # file, flag
    assert resolved.model.pretrained is False and resolved.trainer.load_best_at_end is False
    assert resolved.optim.schedule == "cosine"  # neither: the default

    peers = ["/ip4/127.0.0.1/tcp/1/p2p/" + PEER_ID, "/ip4/127.0.0.1/tcp/2/p2p/" + PEER_ID]
    args = ["--initial-peers", peers[0], "--initial-peers", peers[1], "--model", "vit_small_patch16_224"]
    params = parsed(join, [*args, "--metrics-port", "9470", "--no-auto-relay"])
    resolved = build_config(str(config), params, JOIN_FLAGS)
    assert resolved.swarm.initial_peers == peers and resolved.model.name == "vit_small_patch16_224"
    assert resolved.monitor.port == 9470 and resolved.swarm.use_auto_relay is False


def test_every_config_flag_shows_its_fields_doc_default_and_choices():
    for command, flags, model in [
        (join, JOIN_FLAGS, RunConfig),
        (train, TRAIN_FLAGS, RunConfig),
        (coordinator, COORDINATOR_FLAGS, CoordinatorConfig),
    ]:
        options = {param.name: param for param in command.params}
        for flag in flags:
            field = config_field(model, flag.key)
            option = options[flag.param]
            assert field.description, f"{flag.key}: a flag's field needs a docstring, which is the flag's help"
            assert option.help.startswith(" ".join(field.description.split()).replace("``", "")[:40]), flag.key
            default = field.get_default(call_default_factory=True)
            if default not in (None, []) and not isinstance(default, bool):
                assert option.help.endswith(f"  [default: {default}]"), flag.key
            assert option.default is None or option.multiple, f"{flag.key}: an unset flag must not override the file"
    precision = next(param for param in train.params if param.name == "precision")
    assert list(precision.type.choices) == ["32", "16-mixed", "bf16-mixed"]  # from the field's Literal
    result = CliRunner().invoke(main, ["train", "--precision", "64"])
    assert result.exit_code == 2 and "'64' is not one of '32', '16-mixed', 'bf16-mixed'" in result.output


def test_a_bool_flag_shows_which_side_is_the_default():
    options = {param.name: param for param in train.params}
    assert options["load_best_at_end"].opts == ["--load-best-at-end"]
    assert options["load_best_at_end"].secondary_opts == ["--last-at-end"]
    assert options["load_best_at_end"].help.endswith("[default: load-best-at-end]")
    assert options["download"].help.endswith("[default: no-download]")


# --- every command's --help, as a user sees it ----------------------------------------------------------------------

SNAPSHOTS = Path(__file__).parent / "snapshots" / "help"
HELP_WIDTH = 108  # what click prints in a terminal 110 columns wide or wider (the commands' max_content_width)
UPDATE_SNAPSHOTS = os.environ.get("VITPEER_UPDATE_SNAPSHOTS") == "1"
COMMANDS = "vitpeer join train demo evaluate plot doctor profile coordinator monitor status".split()


@pytest.mark.parametrize("name", COMMANDS)
def test_help_matches_its_snapshot(name: str):
    """A change to any option, default or help text shows here as a diff of the stored ``--help``. After a change
    you mean, rewrite the snapshots and review them with git diff:
    ``VITPEER_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/peer/test_cli.py -k snapshot``."""
    args = ["--help"] if name == "vitpeer" else [name, "--help"]
    result = CliRunner().invoke(main, args, prog_name="vitpeer", terminal_width=HELP_WIDTH)
    assert result.exit_code == 0, result.output
    snapshot = SNAPSHOTS / f"{name}.txt"
    if UPDATE_SNAPSHOTS:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(result.output)
    assert snapshot.is_file(), f"no snapshot {snapshot}: run with VITPEER_UPDATE_SNAPSHOTS=1 to write it"
    assert result.output == snapshot.read_text(), f"vitpeer {' '.join(args)} changed: see this test's docstring"
