"""Coordinator checkpoints on disk: atomic writes, commit by sidecar, damage detection, pruning, timm export."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from vitpeer.coordinator.checkpoints import CHUNK_DELAY_ENV, CheckpointStore, export_for_timm
from vitpeer.peer.core.config import ModelConfig
from vitpeer.peer.core.model import build_model

KWARGS = {"patch_size": 4, "embed_dim": 96, "depth": 2, "num_heads": 3}


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="vit_tiny_patch16_224", img_size=16, kwargs=KWARGS), 10)


def state(net: nn.Module, epoch: int) -> dict[str, Any]:
    optimizer = torch.optim.AdamW(net.parameters())
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "swarm_epoch": epoch}


def checkpoint(store: CheckpointStore, epoch: int, seed: int = 0, **meta: Any) -> dict[str, Any]:
    return store.commit(store.save(state(tiny_net(seed), epoch)), {"swarm_epoch": epoch, **meta})


def test_committed_checkpoint_loads_back_as_the_newest(tmp_path: Path):
    store = CheckpointStore(tmp_path / "checkpoints")
    checkpoint(store, 3, seed=3)
    net = tiny_net(seed=5)
    sidecar = store.commit(store.save(state(net, 5)), {"swarm_epoch": 5, "samples": 640, "val_accuracy": 0.5})

    pt, sidecar_path = tmp_path / "checkpoints" / "step_00000005.pt", tmp_path / "checkpoints" / "step_00000005.json"
    assert pt.is_file() and sidecar_path.is_file()
    on_disk = json.loads(sidecar_path.read_text())
    assert on_disk == sidecar
    assert on_disk["samples"] == 640 and on_disk["val_accuracy"] == 0.5 and on_disk["swarm_epoch"] == 5
    assert on_disk["bytes"] == pt.stat().st_size and len(on_disk["sha256"]) == 64 and on_disk["write_seconds"] >= 0

    loaded = store.load_newest()
    assert loaded is not None
    loaded_sidecar, loaded_state = loaded
    assert loaded_sidecar["file"] == "step_00000005.pt" and loaded_state["swarm_epoch"] == 5
    torch.testing.assert_close(loaded_state["model"], net.state_dict(), rtol=0, atol=0)


def test_checkpoint_without_sidecar_is_never_loaded_and_is_removed(tmp_path: Path):
    store = CheckpointStore(tmp_path)
    checkpoint(store, 1)
    uncommitted = store.save(state(tiny_net(seed=2), 2))
    half = uncommitted.path.read_bytes()[: uncommitted.bytes // 2]
    leftover = tmp_path / "step_00000009.pt.tmp"
    leftover.write_bytes(half)

    assert [sidecar["swarm_epoch"] for sidecar in store.complete()] == [1]
    assert store.newest()["swarm_epoch"] == 1
    loaded = store.load_newest()
    assert loaded is not None and loaded[1]["swarm_epoch"] == 1

    assert sorted(store.remove_partial()) == sorted([uncommitted.path, leftover])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_00000001.json", "step_00000001.pt"]
    assert store.load_newest()[1]["swarm_epoch"] == 1


def test_write_killed_midway_leaves_the_old_file_intact(tmp_path: Path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old version")
    partial = tmp_path / "state.pt.tmp"
    size = 8 << 20  # 8 chunks, 0.5 s apart: about 4 s of writing
    code = (
        "import sys; from pathlib import Path; from vitpeer.coordinator.checkpoints import write_atomic; "
        f"write_atomic(Path(sys.argv[1]), b'n' * {size})"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(target)], env={**os.environ, CHUNK_DELAY_ENV: "0.5", "OMP_NUM_THREADS": "1"}
    )
    try:
        deadline = time.monotonic() + 120
        while not (partial.is_file() and partial.stat().st_size > 0):
            assert child.poll() is None, f"the writer exited ({child.returncode}) before its .tmp appeared"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)

    assert target.read_bytes() == b"old version"
    assert 0 < partial.stat().st_size < size


def test_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path: Path):
    store = CheckpointStore(tmp_path)
    older = tiny_net(seed=1)
    store.commit(store.save(state(older, 1)), {"swarm_epoch": 1})
    checkpoint(store, 2, seed=2)
    newest = tmp_path / "step_00000002.pt"
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - byte for byte in data[middle : middle + 16])
    newest.write_bytes(bytes(data))

    assert store.newest()["swarm_epoch"] == 2  # same size: only the sha256 can tell
    loaded = store.load_newest()
    assert loaded is not None
    assert loaded[0]["swarm_epoch"] == 1 and loaded[1]["swarm_epoch"] == 1
    torch.testing.assert_close(loaded[1]["model"], older.state_dict(), rtol=0, atol=0)


def test_prune_keeps_the_newest_and_the_best(tmp_path: Path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for epoch, accuracy in [(1, 0.9), (2, 0.5), (3, 0.6), (4, 0.7), (5, 0.4)]:
        checkpoint(store, epoch, val_accuracy=accuracy)

    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"step_0000000{epoch}.{suffix}" for epoch in (1, 4, 5) for suffix in ("json", "pt")
    ]
    assert store.best()["swarm_epoch"] == 1
    assert store.load_newest()[1]["swarm_epoch"] == 5


def test_export_loads_in_timm_with_the_same_weights_and_outputs(tmp_path: Path):
    net = tiny_net(seed=7).eval()
    model_args = {**KWARGS, "num_classes": 10, "img_size": 16}
    export = tmp_path / "best"
    export_for_timm(tiny_net(seed=1), model_args, {"eval_accuracy": 0.1}, export)
    export_for_timm(net, model_args, {"eval_accuracy": 0.75, "swarm_epoch": 12}, export)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["best"]
    assert json.loads((export / "all_results.json").read_text()) == {"eval_accuracy": 0.75, "swarm_epoch": 12}
    loaded = timm.create_model("local-dir:" + str(export), pretrained=True).eval()
    torch.testing.assert_close(loaded.state_dict(), net.state_dict())
    batch = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), net(batch))


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.parametrize("failing", [".pt.tmp", ".json.tmp"], ids=["checkpoint", "sidecar"])
def test_a_full_disk_during_a_write_leaves_no_trace_and_prunes_nothing(tmp_path: Path, monkeypatch, failing: str):
    store = CheckpointStore(tmp_path, keep_last=2)
    checkpoint(store, 1, seed=1, val_accuracy=0.2)
    checkpoint(store, 2, seed=2, val_accuracy=0.3)  # a third checkpoint would prune the first
    before = sorted(path.name for path in tmp_path.iterdir())
    fsync = os.fsync

    def full_disk(fd: int) -> None:
        if fd_path(fd).endswith(failing):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=rf"step_00000003{failing[:-4]}.*No space left on device") as raised:
        checkpoint(store, 3, seed=3, val_accuracy=0.9)
    monkeypatch.undo()

    assert raised.value.errno == errno.ENOSPC
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # no .tmp, no uncommitted .pt, none pruned
    assert [sidecar["swarm_epoch"] for sidecar in store.complete()] == [1, 2]
    assert store.load_newest()[1]["swarm_epoch"] == 2 and store.best()["swarm_epoch"] == 2
    checkpoint(store, 3, seed=3, val_accuracy=0.9)  # with room again, the next write succeeds and prunes
    assert [sidecar["swarm_epoch"] for sidecar in store.complete()] == [2, 3]


def test_a_checkpoint_is_synced_and_named_on_disk_before_it_counts_and_before_anything_is_pruned(
    tmp_path: Path, monkeypatch
):
    store = CheckpointStore(tmp_path, keep_last=1)
    checkpoint(store, 1)
    events: list[tuple[str, str]] = []
    fsync, replace, unlink = os.fsync, os.replace, os.unlink
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", fd_path(fd))), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("rename", str(dst))), replace(src, dst))[1])
    monkeypatch.setattr(os, "unlink", lambda path: (events.append(("unlink", str(path))), unlink(path))[1])
    checkpoint(store, 2)
    monkeypatch.undo()

    directory, pt, sidecar = str(tmp_path), str(tmp_path / "step_00000002.pt"), str(tmp_path / "step_00000002.json")
    assert events[:6] == [
        ("fsync", pt + ".tmp"),
        ("rename", pt),
        ("fsync", directory),  # the rename is on disk before the sidecar is written
        ("fsync", sidecar + ".tmp"),
        ("rename", sidecar),
        ("fsync", directory),  # committed: only now may the older checkpoint go
    ]
    assert events[6:] == [
        ("unlink", str(tmp_path / "step_00000001.json")),
        ("fsync", directory),  # uncommitted on disk before its file goes
        ("unlink", str(tmp_path / "step_00000001.pt")),
    ]


def test_every_best_file_is_synced_under_its_final_name_before_all_results_marks_the_export_done(
    tmp_path: Path, monkeypatch
):
    model_args = {**KWARGS, "num_classes": 10, "img_size": 16}
    export_for_timm(tiny_net(seed=1), model_args, {"eval_accuracy": 0.1}, tmp_path / "best")
    events: list[tuple[str, str]] = []
    fsync, replace, unlink = os.fsync, os.replace, os.unlink
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", fd_path(fd))), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("rename", str(dst))), replace(src, dst))[1])
    monkeypatch.setattr(os, "unlink", lambda path, **kw: (events.append(("unlink", str(path))), unlink(path, **kw))[1])
    export_for_timm(tiny_net(seed=2), model_args, {"eval_accuracy": 0.2}, tmp_path / "best")
    monkeypatch.undo()

    best, staging = tmp_path / "best", tmp_path / "best.tmp"
    assert events == [
        ("unlink", str(best / "all_results.json")),  # the previous export is no longer marked done...
        ("fsync", str(best)),  # ...on disk, before its files change
        ("fsync", str(staging / "config.json")),
        ("rename", str(best / "config.json")),
        ("fsync", str(staging / "model.safetensors")),
        ("rename", str(best / "model.safetensors")),
        ("fsync", str(best)),
        ("fsync", str(best / "all_results.json.tmp")),
        ("rename", str(best / "all_results.json")),
        ("fsync", str(best)),
    ]


def test_an_export_cut_off_by_a_full_disk_leaves_the_previous_best_whole_and_no_tmp(tmp_path: Path, monkeypatch):
    previous = tiny_net(seed=1).eval()
    model_args = {**KWARGS, "num_classes": 10, "img_size": 16}
    export = tmp_path / "best"
    export_for_timm(previous, model_args, {"eval_accuracy": 0.5, "swarm_epoch": 4}, export)
    save_file = safetensors.torch.save_file

    def full_disk(tensors: dict[str, torch.Tensor], filename: str, *args: Any, **kwargs: Any) -> None:
        save_file(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])  # the disk filled up after 1000 bytes
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match=f"{export}.*No space left on device"):
        export_for_timm(tiny_net(seed=2), model_args, {"eval_accuracy": 0.75, "swarm_epoch": 8}, export)
    monkeypatch.undo()

    assert sorted(path.name for path in tmp_path.iterdir()) == ["best"]
    assert sorted(path.name for path in export.iterdir()) == ["all_results.json", "config.json", "model.safetensors"]
    assert json.loads((export / "all_results.json").read_text()) == {"eval_accuracy": 0.5, "swarm_epoch": 4}
    loaded = timm.create_model("local-dir:" + str(export), pretrained=True)
    torch.testing.assert_close(loaded.state_dict(), previous.state_dict(), rtol=0, atol=0)


def test_keep_last_zero_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointStore(tmp_path, keep_last=0)
