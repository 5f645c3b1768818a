"""The command line: every command has --help with an example; bad input exits non-zero with the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from vitpeer.peer.cli import main


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
