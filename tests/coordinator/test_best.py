"""What a restarted coordinator serves as the best model (``/best/...``, ``/status``): only the export of an evaluated
checkpoint whose bytes match their sha256, whatever the previous run left in ``best/``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import timm
import torch
from torch import nn

from vitpeer.coordinator.checkpoints import CheckpointStore, export_for_timm
from vitpeer.coordinator.config import CoordinatorConfig
from vitpeer.coordinator.run import Coordinator
from vitpeer.peer.core.config import ModelConfig, RunConfig

KWARGS = {"patch_size": 4, "embed_dim": 96, "depth": 2, "num_heads": 3}
MODEL = ModelConfig(name="vit_tiny_patch16_224", img_size=16, kwargs=KWARGS)
MODEL_ARGS = {**KWARGS, "num_classes": 10, "img_size": 16}


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(MODEL.name, **MODEL_ARGS)


def checkpoint(store: CheckpointStore, epoch: int, **scores: Any) -> dict[str, Any]:
    state = {"model": tiny_net(seed=epoch).state_dict(), "swarm_epoch": epoch}
    meta = {"swarm_epoch": epoch, "samples_seen": 64 * epoch, "config_hash": "0123456789abcdef", **scores}
    return store.commit(store.save(state), meta)


def damage(path: Path) -> None:
    """Flip 16 bytes in the middle: same size, so only the sha256 can tell."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - byte for byte in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def restarted(state_dir: Path) -> Coordinator:
    """A coordinator started on ``state_dir`` as far as best/ goes: it resumed from the newest checkpoint."""
    coordinator = Coordinator(RunConfig(model=MODEL), CoordinatorConfig(state_dir=state_dir))
    newest = coordinator.store.newest()
    epoch = newest["swarm_epoch"] if newest else 0
    coordinator.state = SimpleNamespace(net=tiny_net(seed=epoch), num_classes=10, epoch=epoch)  # what start() loads
    coordinator.publish_best()  # the step of start() after resuming
    return coordinator


def served_model(coordinator: Coordinator) -> nn.Module:
    """The model a volunteer downloads from /best/: the bytes of the two routes, loaded by timm."""
    download = Path(coordinator.coord.state_dir / "download")
    download.mkdir()
    routes = coordinator.routes()
    for name in ("model.safetensors", "config.json"):
        (download / name).write_bytes(routes[f"/best/{name}"]()[1])
    return timm.create_model(f"local-dir:{download}", pretrained=True)


def test_a_restart_serves_the_best_intact_checkpoint_not_a_damaged_one_nor_an_unevaluated_one(tmp_path: Path):
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=5)
    checkpoint(store, 1, val_accuracy=0.4, val_loss=1.5, val_samples=64)
    best_before = checkpoint(store, 2, val_accuracy=0.9, val_loss=0.3, val_samples=64)
    checkpoint(store, 3, val_accuracy=None, val_loss=None, eval_error="RuntimeError: out of memory")
    results = {"checkpoint": best_before["file"], "swarm_epoch": 2, "eval_accuracy": 0.9}
    export_for_timm(tiny_net(seed=2), MODEL_ARGS, results, tmp_path / "best")  # what the previous run served
    damage(tmp_path / "checkpoints" / "step_00000002.pt")  # on disk while the coordinator was down

    coordinator = restarted(tmp_path)

    assert coordinator.status()["checkpoints"]["best"]["file"] == "step_00000001.pt"
    served = served_model(coordinator)
    torch.testing.assert_close(served.state_dict(), tiny_net(seed=1).state_dict(), rtol=0, atol=0)
    results = json.loads((tmp_path / "best" / "all_results.json").read_text())
    assert (results["checkpoint"], results["swarm_epoch"], results["eval_accuracy"]) == ("step_00000001.pt", 1, 0.4)


def test_a_restart_with_no_evaluated_intact_checkpoint_serves_no_best(tmp_path: Path):
    store = CheckpointStore(tmp_path / "checkpoints")
    evaluated = checkpoint(store, 1, val_accuracy=0.7, val_loss=0.9, val_samples=64)
    checkpoint(store, 2, val_accuracy=None, val_loss=None, eval_error="ValueError: the validation split is empty")
    results = {"checkpoint": evaluated["file"], "swarm_epoch": 1, "eval_accuracy": 0.7}
    export_for_timm(tiny_net(seed=1), MODEL_ARGS, results, tmp_path / "best")
    damage(tmp_path / "checkpoints" / "step_00000001.pt")

    coordinator = restarted(tmp_path)

    assert coordinator.status()["checkpoints"]["best"] is None
    with pytest.raises(FileNotFoundError, match="no model.safetensors yet"):  # the API's 404
        coordinator.routes()["/best/model.safetensors"]()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoints"]


def test_an_export_a_crash_cut_off_is_redone_from_the_best_checkpoint_at_restart(tmp_path: Path):
    store = CheckpointStore(tmp_path / "checkpoints")
    best = checkpoint(store, 1, val_accuracy=0.8, val_loss=0.5, val_samples=64)
    checkpoint(store, 2, val_accuracy=0.1, val_loss=2.0, val_samples=64)
    results = {"checkpoint": best["file"], "swarm_epoch": 1, "eval_accuracy": 0.8}
    export_for_timm(tiny_net(seed=1), MODEL_ARGS, results, tmp_path / "best")
    # killed while exporting another model: its weights were renamed into best/, all_results.json not yet
    export_for_timm(tiny_net(seed=2), MODEL_ARGS, {}, tmp_path / "best")
    (tmp_path / "best" / "all_results.json").unlink()

    coordinator = restarted(tmp_path)

    torch.testing.assert_close(served_model(coordinator).state_dict(), tiny_net(seed=1).state_dict(), rtol=0, atol=0)
    assert json.loads((tmp_path / "best" / "all_results.json").read_text())["checkpoint"] == "step_00000001.pt"


def test_after_a_failed_export_the_next_checkpoint_exports_the_best_even_when_it_is_not_the_new_one(tmp_path: Path):
    coordinator = restarted(tmp_path)  # a first run: no checkpoint, no best
    first = checkpoint(coordinator.store, 1, val_accuracy=0.8, val_loss=0.5, val_samples=64)
    # its export failed (a full disk): best/ was withdrawn, and the run went on
    coordinator.state = SimpleNamespace(net=tiny_net(seed=2), num_classes=10, epoch=2)
    coordinator.publish_best(fresh=checkpoint(coordinator.store, 2, val_accuracy=0.3, val_loss=2.0, val_samples=64))
    assert json.loads((tmp_path / "best" / "all_results.json").read_text())["checkpoint"] == first["file"]
    torch.testing.assert_close(served_model(coordinator).state_dict(), tiny_net(seed=1).state_dict(), rtol=0, atol=0)

    coordinator.state = SimpleNamespace(net=tiny_net(seed=3), num_classes=10, epoch=3)
    coordinator.publish_best(fresh=checkpoint(coordinator.store, 3, val_accuracy=0.95, val_loss=0.1, val_samples=64))
    assert json.loads((tmp_path / "best" / "all_results.json").read_text())["checkpoint"] == "step_00000003.pt"


def test_a_best_checkpoint_damaged_after_it_was_hashed_is_not_exported(tmp_path: Path):
    store = CheckpointStore(tmp_path / "checkpoints")
    checkpoint(store, 1, val_accuracy=0.5, val_loss=1.0, val_samples=64)
    checkpoint(store, 2, val_accuracy=0.9, val_loss=0.2, val_samples=64)
    coordinator = Coordinator(RunConfig(model=MODEL), CoordinatorConfig(state_dir=tmp_path))
    assert coordinator.store.best()["swarm_epoch"] == 2  # hashed now: intact
    damaged = tmp_path / "checkpoints" / "step_00000002.pt"
    stat = damaged.stat()
    damage(damaged)
    os.utime(damaged, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and time as before: only reading tells
    coordinator.state = SimpleNamespace(net=tiny_net(seed=2), num_classes=10, epoch=2)

    coordinator.publish_best()

    torch.testing.assert_close(served_model(coordinator).state_dict(), tiny_net(seed=1).state_dict(), rtol=0, atol=0)
    assert coordinator.status()["checkpoints"]["best"]["file"] == "step_00000001.pt"
