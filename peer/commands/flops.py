"""``vitpeer profile MODEL``: how big and how costly one timm model is, before a peer commits a machine to it.

What is measured, and how to read it:

- **parameters** and **size**: every parameter and buffer of the model as built (float32, 4 bytes each); size is in
  MiB (2**20 bytes). This is the memory the weights alone take on a device; training needs about four times as much
  (gradients and two Adam moments) plus activations.
- **FLOPs** and **MACs**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward of the whole batch (no
  gradients). It counts the matrix products (``linear`` layers, the patch-embedding convolution and the attention
  products ``Q @ K^T`` and ``scores @ V``), not softmax, layer norms, GELUs or additions, which are a few percent at
  most. One multiply-accumulate (MAC) is two FLOPs, so MACs = FLOPs / 2.
- **latency**: wall time of one forward of the batch, median and 90th percentile over ``runs`` timed forwards after
  ``warmup`` untimed ones (the first forwards allocate memory and pick kernels). On CUDA the device is synchronized
  before and after each forward, so the time covers the work, not just its launch. On CPU it depends on the number of
  threads torch uses (``OMP_NUM_THREADS``), which the result reports.

Why the FLOP count needs one extra formula: on CPU, PyTorch runs ``scaled_dot_product_attention`` (what timm's
``fused_attn`` blocks call) as ``aten._scaled_dot_product_flash_attention_for_cpu``, for which ``FlopCounterMode``
has no formula, so it would silently count the attention products as zero (CUDA's flash, efficient and cuDNN kernels
are counted; so is the plain ``bmm`` path). ``count_flops`` adds the formula, so a model counts the same on every
device. Published FLOP counts of ViTs often leave the attention products out, so they read lower than this one
(README, "Around a run", has ``vit_base_patch16_224``'s count both ways).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import torch

DEVICES = ("cpu", "cuda")


def attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one attention call given its ``[batch, heads, tokens, head_dim]`` shapes: ``Q @ K^T`` then
    ``scores @ V``, two FLOPs per multiply-accumulate. Key and value may have fewer heads than the query (grouped
    queries): each query head still multiplies a full set of keys and values."""
    batch, heads, queries, dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * dim + 2 * batch * heads * queries * keys * value_dim


def uncounted_attention_ops() -> dict[Any, Callable[..., int]]:
    """Attention kernels ``FlopCounterMode`` has no formula for in this torch, mapped to ``attention_flops``."""
    import torch

    ops = [getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)]
    return {op: attention_flops for op in ops if op is not None}


def flop_kind(op: Any) -> str:
    """Group an aten op for the summary: ``attention`` kernels, ``conv`` (patch embedding), ``matmul`` (linear layers,
    and attention products in models that multiply explicitly), or ``other``."""
    name = str(op)
    if "attention" in name:
        return "attention"
    if "conv" in name:
        return "conv"
    if "mm" in name:
        return "matmul"
    return "other"


def count_flops(model: torch.nn.Module, inputs: torch.Tensor) -> dict[str, int]:
    """FLOPs of one forward of ``model`` on ``inputs`` (no gradients), by kind (see ``flop_kind``); runs the forward
    once, on whatever device ``model`` and ``inputs`` are."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=uncounted_attention_ops()) as counter:
        model(inputs)
    by_kind: dict[str, int] = {}
    for op, flops in counter.get_flop_counts()["Global"].items():
        by_kind[flop_kind(op)] = by_kind.get(flop_kind(op), 0) + int(flops)
    return by_kind


def time_forward(model: torch.nn.Module, inputs: torch.Tensor, runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``runs`` forwards after ``warmup`` untimed ones; on CUDA synchronized around each, so
    a time covers the kernels' work and not only their launch."""
    import torch

    sync = torch.cuda.synchronize if inputs.device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for run in range(warmup + runs):
            sync()
            start = time.perf_counter()
            model(inputs)
            sync()
            if run >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return times


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between the two nearest values (numpy's default)."""
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low, high = math.floor(at), math.ceil(at)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def check_device(device: str) -> torch.device:
    """``device`` as a torch device, or ValueError naming what is wrong (an unknown kind, or CUDA without a GPU)."""
    import torch

    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in DEVICES:
        raise ValueError(f"device {device!r} is not supported; use one of {', '.join(DEVICES)}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU; profile on cpu instead")
    return resolved


def random_timm_model(name: str, img_size: int | None, num_classes: int) -> torch.nn.Module:
    """timm's ``name`` with random weights (never downloads), in eval mode; ValueError for an unknown name or an
    ``img_size`` the model does not take."""
    import difflib

    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown timm model {name!r}; {hint}list the ViTs with timm.list_models('vit_*')")
    size: dict[str, Any] = {"img_size": img_size} if img_size else {}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **size)
    except TypeError as err:
        if img_size and "img_size" in str(err):
            raise ValueError(f"model {name!r} does not take an image size; leave out --img-size") from None
        raise
    return model.eval()


def profile_model(
    name: str,
    img_size: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    runs: int = 20,
    warmup: int = 3,
    num_classes: int = 1000,
) -> dict[str, Any]:
    """Build timm's ``name`` with random weights and measure it (see the module docstring for what each number is).

    Args:
        name: a timm model name, e.g. ``vit_base_patch16_224``.
        img_size: input side in pixels; None: the model's default (224 for ``*_224`` models). ViTs take any
            multiple of their patch size; FLOPs grow with the number of patches, attention with its square.
        batch_size: images per forward; FLOPs grow linearly with it, latency usually less than linearly.
        device: ``cpu`` or ``cuda`` (``cuda:N`` for one GPU of several); latency is measured there.
        runs: timed forwards; more give a steadier median and p90.
        warmup: untimed forwards first (allocation, kernel selection, caches).
        num_classes: classifier outputs; changes the head's size only.

    Returns:
        A JSON-serializable dict: model, img_size, input_shape, batch_size, device, threads, num_classes,
        params_total, params_trainable, size_mb, flops, macs, flops_by_kind, latency_ms_median, latency_ms_p90,
        runs, warmup, torch, timm.

    Raises:
        ValueError: an unknown model name, an unsupported or absent device, or a count below its minimum.
    """
    for option, value, least in (("batch_size", batch_size, 1), ("runs", runs, 1), ("warmup", warmup, 0)):
        if value < least:
            raise ValueError(f"{option} = {value}; it must be at least {least}")
    if img_size is not None and img_size < 1:
        raise ValueError(f"img_size = {img_size}; it must be at least 1 (or None for the model's default)")
    target = check_device(device)
    import timm
    import torch
    from timm.data.config import resolve_model_data_config  # timm.data does not re-export it to type checkers

    model = random_timm_model(name, img_size, num_classes)
    channels, height, width = resolve_model_data_config(model)["input_size"]
    if img_size:
        height = width = img_size
    model = model.to(target)
    inputs = torch.randn(batch_size, channels, height, width, device=target)

    flops_by_kind = count_flops(model, inputs)
    flops = sum(flops_by_kind.values())
    times = time_forward(model, inputs, runs, warmup)
    params = list(model.parameters())
    tensors = params + list(model.buffers())
    return {
        "model": name,
        "img_size": height if height == width else [height, width],
        "input_shape": [batch_size, channels, height, width],
        "batch_size": batch_size,
        "device": str(target),
        "threads": torch.get_num_threads() if target.type == "cpu" else None,
        "num_classes": num_classes,
        "params_total": sum(p.numel() for p in params),
        "params_trainable": sum(p.numel() for p in params if p.requires_grad),
        "size_mb": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
        "flops": flops,
        "macs": flops // 2,
        # what most published tables (and torch's counter on CPU before our formula) give: no attention products
        "flops_without_attention": flops - flops_by_kind.get("attention", 0),
        "macs_without_attention": (flops - flops_by_kind.get("attention", 0)) // 2,
        "flops_by_kind": flops_by_kind,
        "latency_ms_median": statistics.median(times),
        "latency_ms_p90": percentile(times, 90),
        "runs": runs,
        "warmup": warmup,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def si(value: float) -> str:
    """``value`` with an SI prefix and two decimals: 86567656 -> '86.57 M', 33697001472 -> '33.70 G'."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}"
    return f"{value:.0f}"


def format_profile(result: dict[str, Any]) -> str:
    """The readable table ``vitpeer profile`` prints (without ``--json``)."""
    kinds = sorted(result["flops_by_kind"].items(), key=lambda item: -item[1])
    split = ", ".join(f"{kind} {si(flops)}" for kind, flops in kinds)
    threads = result["threads"]
    where = result["device"] + (f", {threads} thread{'s' * (threads != 1)}" if threads else "")
    rows = [
        ("model", f"{result['model']} ({result['num_classes']} classes, random weights)"),
        ("input", " x ".join(str(side) for side in result["input_shape"])),
        ("parameters", f"{si(result['params_total'])} (trainable {si(result['params_trainable'])})"),
        ("size", f"{result['size_mb']:.1f} MiB (parameters + buffers)"),
        ("MACs", f"{si(result['macs'])} ({si(result['macs_without_attention'])} without attention products)"),
        ("FLOPs", f"{si(result['flops'])} ({split})" if split else si(result["flops"])),
        ("", f"{si(result['flops_without_attention'])} without attention products, as most published tables count"),
        (
            "latency",
            f"median {result['latency_ms_median']:.1f} ms, p90 {result['latency_ms_p90']:.1f} ms "
            f"({result['runs']} runs, batch {result['batch_size']}, {where})",
        ),
        ("versions", f"torch {result['torch']}, timm {result['timm']}"),
    ]
    return "\n".join(f"{label:<12}{text}" for label, text in rows)


@click.command("profile")
@click.argument("model")
@click.option("--img-size", type=click.IntRange(min=1), help="Input side in pixels. [default: the model's, e.g. 224]")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Images per timed forward."
)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True, help="Where latency is timed.")
@click.option(
    "--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed forwards (after 3 untimed)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as one JSON object, nothing else.")
def command(model: str, img_size: int | None, batch_size: int, device: str, runs: int, as_json: bool) -> None:
    """Size, FLOPs and forward latency of a timm MODEL with random weights (nothing is downloaded).

    FLOPs count the matrix products of one forward of the batch (linear layers, attention, patch embedding);
    MACs = FLOPs / 2. Latency is the median and 90th percentile of --runs forwards; on CPU it depends on the
    threads torch uses (OMP_NUM_THREADS).

    \b
    Example: vitpeer profile vit_base_patch16_224
    Example: vitpeer profile vit_small_patch16_224 --img-size 384 --batch-size 32 --device cuda --json
    """
    try:
        result = profile_model(model, img_size=img_size, batch_size=batch_size, device=device, runs=runs)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps(result, indent=2) if as_json else format_profile(result))
