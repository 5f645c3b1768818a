"""``vitpeer evaluate CHECKPOINT``: a trained model's loss, accuracy and per-class report on a held-out split.

It reads any weights a run wrote: a Lightning checkpoint (``checkpoints/last.ckpt``, ``best-*.ckpt``; loaded with
``torch.load(weights_only=True)``, never unpickled as code), the exported ``model.safetensors``, or a coordinator's
export. The run's ``config.yaml`` next to it (or ``--config``) says which model and which data split to build; the
split is the one the run held out (the same ``data.split_seed``), so the numbers are comparable with the run's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report

from vitpeer.peer.core.config import RunConfig
from vitpeer.peer.core.data import VisionDataModule, num_classes
from vitpeer.peer.core.model import build_model, image_config
from vitpeer.peer.core.model.parallel import device_type


def run_config_beside(checkpoint: Path) -> Path:
    """The ``config.yaml`` of the run ``checkpoint`` belongs to: in its folder or the one above (``checkpoints/``)."""
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r}: no such file")
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(f"no config.yaml beside {checkpoint} or in its parent folder; pass --config")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The network's state dict from a Lightning checkpoint (its ``net.`` entries) or a safetensors file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as err:  # torch and safetensors raise many types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    return {name.removeprefix("net."): tensor for name, tensor in state.items() if name.startswith("net.")}


@torch.no_grad()
def run_evaluate(checkpoint: Path, config: RunConfig, split: str = "test") -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``split`` (``test`` or ``val``): loss, accuracy, and precision/recall/F1 per class."""
    device = torch.device(device_type(config.trainer.accelerator))
    classes = num_classes(config.data)
    net = build_model(config.model, classes)
    try:
        net.load_state_dict(load_weights(checkpoint))
    except RuntimeError as err:  # missing/unexpected keys or shapes: another model than the config describes
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{checkpoint} does not fit model {config.model.name!r} of the config: {first}") from None
    net.to(device).eval()
    data = VisionDataModule(config.data, image_config(net, config.model), order_seed=0)
    data.setup()
    loader = data.test_dataloader() if split == "test" else data.val_dataloader()

    loss_sum, labels, predictions = 0.0, [], []
    for images, targets in loader:
        logits = net(images.to(device))
        loss_sum += float(F.cross_entropy(logits, targets.to(device), reduction="sum"))
        labels += targets.tolist()
        predictions += logits.argmax(dim=1).cpu().tolist()
    names = data.class_names or [str(index) for index in range(classes)]
    report = classification_report(
        labels,
        predictions,
        labels=list(range(classes)),
        target_names=names,
        digits=4,
        zero_division=0,  # pyright: ignore[reportArgumentType]  # unannotated in sklearn: inferred str from "warn"
    )
    return {
        "checkpoint": str(checkpoint),
        "split": split,
        "samples": len(labels),
        "loss": loss_sum / len(labels),
        "accuracy": sum(p == t for p, t in zip(predictions, labels, strict=True)) / len(labels),
        "report": report,
    }
