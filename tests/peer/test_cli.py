"""The command line: every command has --help with an example; bad input exits non-zero with the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from peer.cli import main


@pytest.mark.parametrize("command", [[], ["join"], ["demo"]], ids=["vitpeer", "join", "demo"])
def test_help_has_an_example(command: list[str]):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_join_help_lists_the_swarm_options():
    output = CliRunner().invoke(main, ["join", "--help"]).output
    for option in ("--initial-peers", "--run-id", "--host-port", "--announce-ip", "--target-batch-size", "--max-steps"):
        assert option in output


def test_bad_value_exits_with_key_and_value():
    result = CliRunner().invoke(main, ["join", "--batch-size", "0"])
    assert result.exit_code == 2
    assert "data.batch_size = 0" in result.output


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "peer.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "join" in result.stdout
