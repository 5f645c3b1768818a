"""The demo: two real peers on 127.0.0.1 train digits together (``tests/peer/test_local_ranks.py`` starts a second
peer with the address the first printed, as a volunteer would)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitpeer.peer.commands.demo import run_demo

pytestmark = pytest.mark.slow


@pytest.mark.timeout(400)
def test_two_peer_demo_learns_digits_with_identical_parameters(tmp_path: Path):
    """The shipped demo, whole: 2 diloco peers, 30 swarm steps of 4096 samples (``digits_tiny_diloco``), measured
    0.95-0.97 in about 80 s here (the gradient algorithm's demo, 200 steps of 256, measured 0.941 in 365 s). Both
    peers end with the same parameters: the last exact sync of the shared state comes after the last round."""
    accuracy = run_demo(2, "digits_tiny_diloco", tmp_path)
    assert accuracy is not None and accuracy >= 0.85
    states = [torch.load(tmp_path / f"peer-{i}" / "checkpoints" / "last.ckpt", weights_only=False) for i in (1, 2)]
    assert states[0]["swarm_epoch"] == states[1]["swarm_epoch"] == 30
    for name, tensor in states[0]["state_dict"].items():
        torch.testing.assert_close(tensor, states[1]["state_dict"][name], rtol=0, atol=1e-5, msg=name)
