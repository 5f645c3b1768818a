"""The aggregation seam: the rule that turns the parts peers send in a round into the part each of them receives.

hivemind's all-reduce (``hivemind.averaging.allreduce.AllReduceRunner``) splits every averaged tensor into parts and
gives each peer of the group some of them to reduce: every peer sends that reducer its own copy of the part, with the
weight it declares, and gets back the reduced part. hivemind reduces with a plain weighted mean inside its
``TensorPartReducer``. vitpeer's averagers (``hivemind_averagers``, every averager of both algorithms and the
coordinator's) replace that reducer in their own process by ``AggregatingReducer``, which collects a part from every
sender and then calls the run's rule (``swarm.aggregation``) once per part:

    rule(parts, weights) -> reduced part

``parts`` are the senders' tensors of one part (same shape, host memory, in the order they arrived), ``weights`` what
each sender declared; a sender that failed mid-round sends nothing more, and the rule sees only those that sent. A
rule must return a new tensor and leave ``parts`` as they are. It runs in the reducing peer's averager process, once
per part of every round, so it must be fast: a ViT-B's round has hundreds of parts.

The rules:

- ``mean``: hivemind's weighted mean. Any one sender moves the result as far as it likes (a part scaled by 1000, a
  weight of 10**9 it declares itself).
- ``trimmed_mean``: per coordinate, the mean of the parts left after the ``trimmed(n)`` lowest and highest values
  are dropped (with 3 senders, the median); equal weights.
- ``centered_clip``: CenteredClip (Karimireddy, He and Jaggi, 2021): start at the coordinate-wise median and move
  the centre, a few times, by the mean of each part's distance from it, each distance clipped to the median distance.
  A part far from the others moves the result by at most that radius over ``n``; equal weights.

The robust rules give every sender the same weight: a weight is what the sender declares, so it is an attacker's
number. And both first clip every part's length to the median length (``norm_clipped``): with 2 senders nothing can
tell the liar from the honest peer, but a liar no longer than the honest part can at worst cancel it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Aggregation = Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]
"""An aggregation rule: the senders' parts of one part index and their declared weights, to the reduced part."""


def mean(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """hivemind's own rule: the mean of the parts weighted by what each sender declared, summed in arrival order as
    hivemind sums them."""
    total = torch.zeros_like(parts[0], dtype=torch.float32)
    for part, weight in zip(parts, weights, strict=True):
        total.add_(part, alpha=weight)
    return total.div_(sum(weights))


def trimmed(senders: int) -> int:
    """How many of the lowest and of the highest values ``trimmed_mean`` drops per coordinate: a quarter of the
    senders, at least one from 3 senders on (so one liar of 3 or 4 is always dropped), none with 2 or fewer."""
    return 0 if senders < 3 else max(1, senders // 4)


def trimmed_mean(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The coordinate-wise trimmed mean of the parts, every sender with the same weight (two: ``norm_clipped``)."""
    stacked = norm_clipped(parts)
    drop = trimmed(len(parts))
    return stacked.sort(dim=0).values[drop : len(parts) - drop].mean(dim=0).view_as(parts[0])


def norm_clipped(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts flattened into the rows of one float32 tensor, every row's norm clipped to the median norm, the lower
    of two: with two senders, the longer part is shortened to the shorter's length, so a liar paired with one honest
    peer can cancel that round's progress but never reverse or blow it up."""
    stacked = torch.stack([part.float().flatten() for part in parts])
    norms = stacked.norm(dim=1)
    limit = norms.min() if len(norms) == 2 else norms.quantile(0.5)
    return stacked * (limit / norms.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)[:, None]


CLIP_ITERATIONS = 3
"""Moves of the centre in ``centered_clip``: the paper shows a few suffice from a good start; the median is one."""


def centered_clip(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """CenteredClip of the parts (``norm_clipped`` first) around a centre that starts at their coordinate-wise median,
    clipping radius the median distance from the current centre; every sender with the same weight."""
    stacked = norm_clipped(parts)
    if len(parts) < 3:
        return stacked.mean(dim=0).view_as(parts[0])
    centre = stacked.median(dim=0).values
    for _ in range(CLIP_ITERATIONS):
        offsets = stacked - centre
        distances = offsets.norm(dim=1)
        radius = distances.median()
        scale = (radius / distances.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
        centre = centre + (offsets * scale[:, None]).mean(dim=0)
    return centre.view_as(parts[0])


AGGREGATIONS: dict[str, Aggregation] = {"mean": mean, "trimmed_mean": trimmed_mean, "centered_clip": centered_clip}
"""The rules ``swarm.aggregation`` names (its allowed values are these keys)."""


def refusal(received: Sequence[torch.Tensor], own: Sequence[torch.Tensor], bound: float, *, apart: bool) -> str | None:
    """Why the result of a round must not be applied, or None. Each peer reduces a share of every round, so a hostile
    peer answers its share with what it likes; the robust rules cannot help there, this check can: the result must be
    finite; ``apart``: at most ``bound`` times the length of ``own`` (what this peer sent) away from it; else (a step
    to take): at most ``bound`` times as long as ``own`` and not pointing against it (honest peers train the same
    model toward the same goal, and ``own`` is one of the parts the result is made of)."""
    if not all(bool(torch.isfinite(tensor).all()) for tensor in received):
        return "non-finite values (NaN or Inf)"
    received_flat = torch.cat([tensor.float().flatten() for tensor in received])
    own_flat = torch.cat([tensor.float().flatten() for tensor in own])
    own_norm = float(own_flat.norm().clamp_min(torch.finfo(torch.float32).tiny))
    if apart:
        ratio = float((received_flat - own_flat).norm()) / own_norm
        if ratio > bound:
            return f"{ratio:.3g} times the length of what this peer sent, away from it (at most {bound:g})"
        return None
    ratio = float(received_flat.norm()) / own_norm
    if ratio > bound:
        return f"{ratio:.3g} times as long as what this peer sent (at most {bound:g})"
    if float(received_flat @ own_flat) < 0:
        return "it points against this peer's own progress"
    return None
