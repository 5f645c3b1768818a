"""Whether a state downloaded from a peer may be taken: the one check of a ``gradient`` peer, a ``diloco`` peer and
the coordinator (before it writes a checkpoint).

A state must have this run's layout (the shapes and dtypes of the tensors this peer itself would serve), hold only
finite values, carry a swarm step no further than ``EPOCH_AHEAD`` past the newest step this peer sees in a record that
counts (``plausible_limit``; never past the run's ``max_steps``), and, for ``gradient`` states, the optimizer settings
of this run (the learning rate anywhere between 0 and its initial value). ``core.averaging.hivemind_averagers`` runs
the check inside hivemind's download loop, so a refused peer is skipped for the next one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import TrainingProgressSchema
from hivemind.utils import MPFuture, nested_flatten

log = logging.getLogger(__name__)

# No Lightning and no timm here: ``core.averaging.hivemind_averagers`` imports this module.


EPOCH_AHEAD = 2
"""How many swarm steps a downloaded state may be ahead of the newest step this peer sees: its own, or the newest in
the other peers' progress records, read from the DHT as the download begins. Peers report their progress several
times a step, so an honest state is at most one step newer than its peer's record; the second step leaves room for
a step that ends while a large state downloads. A state further ahead would make this peer step its LR schedule that
many times (a state at step 10**6 hung it) and jump past the end of the run: it is refused (see ``download_bound``)."""


def furthest_epoch(seen: int, max_steps: int | None = None) -> int:
    """The newest swarm step a downloaded state may have when the newest step seen is ``seen``: ``seen +
    EPOCH_AHEAD``, never past ``max_steps``, the run's last step (every peer stops there, and the fingerprint makes
    every peer agree on it)."""
    bound = seen + EPOCH_AHEAD
    return bound if max_steps is None else min(bound, max_steps)


def can_read_progress(dht: hivemind.DHT, run_id: str) -> None:
    """Let ``dht`` read the run's progress records (a process without a ``ProgressTracker``: the coordinator).
    hivemind signs them; a node without ``RSASignatureValidator`` cannot even decode them, and its ``get`` never
    returns. These are the validators a tracker adds."""
    dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=run_id), RSASignatureValidator()])


def agreed_epoch(epochs: Sequence[int]) -> int:
    """The swarm step most live progress records agree on: the median of their steps, the upper of two middle ones
    (so with two records, a peer behind follows the one ahead). One record cannot move it: hivemind takes the swarm's
    step as the maximum of the records, so one signed record claiming step 10**6 stalled every honest peer."""
    ordered = sorted(epochs)
    return ordered[len(ordered) // 2]


def plausible_limit(epochs: Sequence[int], max_steps: int | None = None) -> int:
    """The furthest step a progress record may claim and still count (as a peer, its samples, its step): one past
    ``agreed_epoch`` (a peer that has just moved on is one ahead), never past ``max_steps``."""
    limit = agreed_epoch(epochs) + 1
    return limit if max_steps is None else min(limit, max_steps)


def others_epochs(dht: hivemind.DHT, run_id: str, timeout: float = 10.0) -> list[int] | None:
    """The swarm steps in the live progress records of ``run_id``'s peers other than ``dht``'s own (the key
    hivemind's ``ProgressTracker`` publishes, ``<run_id>_progress``; both algorithms use it); None when the DHT does
    not answer within ``timeout`` s."""
    try:
        # hivemind types get() as "a value or a future" whichever return_future is; with it, the future
        future: MPFuture = dht.get(f"{run_id}_progress", latest=True, return_future=True)  # pyright: ignore[reportAssignmentType]
        found = future.result(timeout=timeout)
    except Exception as err:
        log.warning("could not read the swarm's progress (%r): downloads are bounded by max_steps alone", err)
        return None
    if found is None or not isinstance(found.value, dict):
        return []
    own = dht.peer_id.to_bytes()
    records = [getattr(entry, "value", None) for entry in found.value.values()]
    epochs = [
        record.get("epoch")
        for record in records
        if isinstance(record, dict) and record.get("peer_id") != own  # a goodbye is None
    ]
    return [epoch for epoch in epochs if isinstance(epoch, int) and not isinstance(epoch, bool)]


def download_bound(dht: hivemind.DHT, run_id: str, own_epoch: int, max_steps: int | None = None) -> int | None:
    """The newest swarm step a state downloaded now may have (``StateCheck.max_epoch``): ``furthest_epoch`` of the
    newest step seen in a record that counts (``plausible_limit``: a record of its own cannot raise the bound). With
    no other record (everyone left; only servers such as the coordinator remain, which report none) there is nothing
    to measure against: ``max_steps`` alone bounds it."""
    others = others_epochs(dht, run_id)
    if not others:
        return max_steps
    epochs = [own_epoch, *others]
    limit = plausible_limit(epochs, max_steps)
    return furthest_epoch(max(epoch for epoch in epochs if epoch <= limit), max_steps)


class StateRefused(ValueError):
    """A state downloaded from a peer failed ``StateCheck``: it was not taken."""


@dataclass(frozen=True)
class StateCheck:
    """What a state downloaded from a peer must be before this peer takes any of it.

    Peers of one run hold states of one layout (the fingerprint, ``core.swarm.fingerprint``, checks every peer's tensor
    names, shapes and dtypes before it joins), so the layout expected is this peer's own: what it would serve.
    One check for all three takers: a ``gradient`` peer, a ``diloco`` peer, and the coordinator (before it writes a
    checkpoint)."""

    layout: tuple[tuple[torch.Size, torch.dtype], ...]
    """Shape and dtype of every tensor, in the order they are sent."""
    max_epoch: int | None = None
    """The newest swarm step accepted (``furthest_epoch``); None: any (a checkpoint this process wrote)."""
    optimizer: tuple[tuple[str, Any], ...] | None = None
    """``gradient`` states only: this peer's optimizer settings as hivemind flattens them (``optimizer_expectation``).
    A peer's must equal them, but the learning rate, which the schedule moves between 0 and its initial value."""

    @property
    def max_bytes(self) -> int:
        """The most bytes a sender may stream for this state: its tensors uncompressed, a quarter more, and a MiB for
        the metadata and the framing (a compressed state is smaller still). A sender past it is cut off mid-stream."""
        raw = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.layout)
        return int(raw * 1.25) + (1 << 20)

    def refusal(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> str | None:
        """Why the state ``(metadata, tensors)`` must not be taken, or None when it may be."""
        if not isinstance(metadata, dict):
            return f"its metadata is a {type(metadata).__name__}, not a mapping"
        epoch = metadata.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            return f"its swarm step {epoch!r} is not a step number"
        if self.max_epoch is not None and epoch > self.max_epoch:
            return (
                f"it claims swarm step {epoch}, past {self.max_epoch}, the newest this peer accepts (the swarm's "
                f"progress plus {EPOCH_AHEAD}, at most the run's max_steps)"
            )
        if len(tensors) != len(self.layout):
            return f"it holds {len(tensors)} tensors where this run's state has {len(self.layout)}"
        for index, (tensor, (shape, dtype)) in enumerate(zip(tensors, self.layout, strict=True)):
            if not isinstance(tensor, torch.Tensor) or tensor.shape != shape or tensor.dtype != dtype:
                found = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else "no tensor"
                return f"its tensor {index} is {found} where this run's is {tuple(shape)} {dtype}"
        for index, tensor in enumerate(tensors):
            if not torch.isfinite(tensor).all():
                return f"its tensor {index} holds NaN or Inf"
        if self.optimizer is not None:
            return _optimizer_refusal(self.optimizer, metadata.get("optimizer_metadata"))
        return None

    def verify(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> None:
        """Raise ``StateRefused`` when ``refusal`` names a reason."""
        reason = self.refusal(metadata, tensors)
        if reason is not None:
            raise StateRefused(f"refused a state from a peer: {reason}")


class _LearningRate(float):
    """Marks where the learning rate sits among an optimizer's flattened settings (its value: the largest allowed)."""


def optimizer_expectation(optimizer: torch.optim.Optimizer) -> tuple[tuple[str, Any], ...]:
    """``optimizer``'s state as hivemind flattens it for a download (``state_averager.dump_optimizer_state``: every
    element of ``optimizer.state_dict()``, in ``hivemind.utils.nested_flatten``'s order), as (kind, value) pairs:
    ``("tensor", None)``, ``("lr", initial_lr)`` or ``("value", setting)``."""
    state = optimizer.state_dict()
    groups = [{**group, "lr": _LearningRate(group.get("initial_lr", group["lr"]))} for group in state["param_groups"]]
    expected = []
    for element in nested_flatten({**state, "param_groups": groups}):
        if isinstance(element, torch.Tensor):
            expected.append(("tensor", None))
        elif isinstance(element, _LearningRate):
            expected.append(("lr", float(element)))
        else:
            expected.append(("value", element))
    return tuple(expected)


def _optimizer_refusal(expected: tuple[tuple[str, Any], ...], found: Any) -> str | None:
    if not isinstance(found, list) or len(found) != len(expected):
        size = len(found) if isinstance(found, list) else None
        return f"its optimizer state has {size} entries where this run's has {len(expected)}"
    tensors = 0
    for index, ((kind, ours), entry) in enumerate(zip(expected, found, strict=True)):
        theirs = entry.get("value") if isinstance(entry, dict) else None
        if kind == "tensor":
            if not isinstance(entry, dict) or entry.get("type") != "tensor" or entry.get("index") != tensors:
                return f"its optimizer entry {index} is {entry!r} where this run's holds tensor {tensors}"
            tensors += 1
        elif not isinstance(entry, dict) or entry.get("type") != "value":
            return f"its optimizer entry {index} is {entry!r} where this run's holds a setting"
        elif kind == "lr":
            if not isinstance(theirs, int | float) or isinstance(theirs, bool) or not 0 <= theirs <= ours * (1 + 1e-6):
                return f"its learning rate {theirs!r} is outside this run's [0, {ours}]"
        elif theirs != ours or isinstance(theirs, bool) != isinstance(ours, bool):
            return f"its optimizer setting {index} is {theirs!r} where this run's is {ours!r}"
    return None


def training_state_check(averager: Any, max_epoch: int | None) -> StateCheck:
    """The ``StateCheck`` of a hivemind ``TrainingStateAverager``'s state (``gradient``): what its ``get_current_state``
    sends (the optimizer's parameters, the extra tensors, the optimizer's state tensors) and its optimizer settings,
    read without copying a tensor."""
    optimizer = averager.optimizer
    params = [param for group in optimizer.param_groups for param in group["params"]]
    statistics = [item for item in nested_flatten(optimizer.state_dict()) if isinstance(item, torch.Tensor)]
    layout = tuple((tensor.shape, tensor.dtype) for tensor in [*params, *averager.extra_tensors, *statistics])
    return StateCheck(layout=layout, max_epoch=max_epoch, optimizer=optimizer_expectation(optimizer))
