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


AGGREGATIONS: dict[str, Aggregation] = {"mean": mean}
"""The rules ``swarm.aggregation`` names (its allowed values are these keys)."""
