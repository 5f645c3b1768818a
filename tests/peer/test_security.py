"""A checkpoint is data, never code: one built to run code when unpickled is refused by every command that reads
checkpoints, and the code never runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vitpeer.peer.cli import main


class Trap:
    """Unpickling this calls ``open(marker, "w")``: the marker file appearing means code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize(
    "command",
    [
        "join --resume {ckpt} --output-dir {out}",
        "train --resume {ckpt} --output-dir {out}",
        "evaluate {ckpt} --config digits_tiny",
    ],
    ids=["join-resume", "train-resume", "evaluate"],
)
def test_a_checkpoint_that_would_run_code_is_refused_unrun(command: str, tmp_path: Path):
    marker, ckpt = tmp_path / "code-ran", tmp_path / "trap.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": Trap(marker)}, ckpt)
    assert not marker.exists()

    result = CliRunner().invoke(main, command.format(ckpt=ckpt, out=tmp_path / "out").split())

    assert result.exit_code == 2, result.output
    assert "not a readable checkpoint" in result.stderr and str(ckpt) in result.stderr, result.stderr
    assert not marker.exists(), "unpickling ran code from the checkpoint"
