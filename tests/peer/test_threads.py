"""A peer's torch threads are its share of the cores: peers started side by side on one host do not oversubscribe
them, and a peer takes its threads back when the other is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from vitpeer.peer.core.runtime import threads as threads_module
from vitpeer.peer.core.runtime.threads import ThreadShare

OTHER = """
import sys
from vitpeer.peer.core.runtime.threads import ThreadShare
share = ThreadShare()
print(share.choice.threads, share.choice.sharers, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("VITPEER_COMPUTE_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield tmp_path / "registry"
    torch.set_num_threads(before)


def test_two_processes_on_the_same_cores_split_them_and_one_takes_them_back(registry, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline().split() == [str(cores), "1"]  # alone: every core
        share = ThreadShare()
        assert (share.choice.sharers, share.choice.threads) == (2, max(1, cores // 2))
        assert torch.get_num_threads() == max(1, cores // 2)
        assert "shared by 2 vitpeer process(es)" in str(share.choice)
    finally:
        other.send_signal(signal.SIGKILL)  # killed: its registry file stays behind, stale
        other.wait()
    monkeypatch.setattr(threads_module, "RECHECK_S", 0.0)
    share.on_train_batch_end()
    assert (share.choice.sharers, share.choice.threads) == (1, cores)
    assert [path.name for path in registry.iterdir()] == [f"{os.getpid()}.json"]  # the stale one removed
    share.close()
    assert not any(registry.iterdir())


def test_threads_fixed_by_the_flag_or_the_environment_count_nothing(registry, monkeypatch):
    share = ThreadShare(1)
    assert (share.choice.threads, share.choice.sharers) == (1, None) and not registry.exists()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert ThreadShare().choice.sharers is None and torch.get_num_threads() == 1
