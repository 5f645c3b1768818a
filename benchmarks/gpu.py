"""GPU throughput: one device trains ViT-B/16 at 224 px in bf16; samples/s and model FLOPs utilisation (MFU).

What one step is: a forward of a random batch (made on the device once, so no data loading is timed), cross-entropy,
backward and an AdamW step, under ``torch.autocast(bfloat16)`` with fp32 master weights, as a peer's training step
is with ``--precision bf16-mixed``. Steps are timed with the device synchronized before and after, after ``warmup``
untimed ones (the first allocate memory, pick kernels and, compiled, compile).

MFU = samples/s x 3 x forward FLOPs per sample / the device's dense bf16 peak. Forward FLOPs are counted by
``commands.flops.count_flops`` (matrix products including the attention products: 35.1 GFLOPs for ViT-B/16 at
224 px; tables that leave the attention products out say 33.7); 3 x counts the backward as twice the forward.

Three variants, each on a freshly built model: attention as plain matrix products (``fused_attn`` off), PyTorch's
fused ``scaled_dot_product_attention`` (timm's default), and the fused one under ``torch.compile``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from vitpeer.peer.commands.flops import count_flops

PEAK_BF16_DENSE = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
"""Dense bf16 peak FLOP/s by device name fragment (vendor data sheets, without sparsity)."""
VARIANTS = {"matmul attention": (False, False), "fused attention": (True, False), "fused + torch.compile": (True, True)}
"""name: (timm's fused attention, torch.compile)."""
VARIANTS_EAGER = ("matmul attention", "fused attention")


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when its name is known; None on CPU or an unknown device."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_BF16_DENSE.items() if fragment in name), None)


def build(model_name: str, img_size: int, fused: bool, device: torch.device, **kwargs: Any) -> torch.nn.Module:
    import timm
    from timm.layers import set_fused_attn

    set_fused_attn(fused)  # read by each attention block as it is built
    try:
        return timm.create_model(model_name, img_size=img_size, num_classes=1000, **kwargs).to(device)
    finally:
        set_fused_attn(True)


def time_steps(model: torch.nn.Module, batch: int, img_size: int, steps: int, warmup: int, compiled: bool) -> float:
    """Seconds per training step of ``model`` on a random batch, median of ``steps`` after ``warmup``."""
    device = next(model.parameters()).device
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(warmup + steps):
        sync()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def run(
    model_name: str = "vit_base_patch16_224",
    img_size: int = 224,
    batch: int = 128,
    steps: int = 20,
    warmup: int = 5,
    device: str | None = None,
    variants: tuple[str, ...] = tuple(VARIANTS),
    **model_kwargs: Any,
) -> dict[str, Any]:
    """The samples/s and MFU of each of ``variants`` on ``device`` (the GPU when there is one)."""
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    probe = build(model_name, img_size, True, where, **model_kwargs)
    flops = sum(count_flops(probe, torch.zeros(1, 3, img_size, img_size, device=where)).values())
    del probe
    peak = peak_flops(where)
    results: dict[str, Any] = {
        "model": model_name,
        "img_size": img_size,
        "batch": batch,
        "device": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu",
        "forward_flops_per_sample": flops,
        "peak_flops": peak,
        "variants": {},
    }
    for name in variants:
        fused, compiled = VARIANTS[name]
        model = build(model_name, img_size, fused, where, **model_kwargs)
        seconds = time_steps(model, batch, img_size, steps, warmup, compiled)
        samples_per_s = batch / seconds
        mfu = samples_per_s * 3 * flops / peak if peak else None
        results["variants"][name] = {"step_s": seconds, "samples_per_s": samples_per_s, "mfu": mfu}
        del model
        if where.type == "cuda":
            torch.cuda.empty_cache()
    return results
