"""Several processes, one model: the Lightning strategy for each ``parallel.strategy`` and FSDP2 sharding by size.

- ``single``: one process on one device.
- ``ddp``: Lightning's ``DDPStrategy``. Every rank holds the whole model; backward all-reduces the gradients (NCCL on
  GPUs, gloo on CPUs), so every rank takes the same optimizer step and the replicas stay identical.
- ``fsdp``: Lightning's ``ModelParallelStrategy`` with FSDP2 ``fully_shard`` applied by ``shard_model`` in the
  module's ``configure_model``. Each rank keeps 1/world of every parameter, gradient and optimizer state; a unit's
  parameters are all-gathered just before it runs and its gradients reduce-scattered after backward. (Lightning's
  ``FSDPStrategy``, FSDP1, refuses CPUs; FSDP2 runs on gloo, so the sharded path is tested on CPU machines.)
  Checkpoints are saved as one full state dict (``save_distributed_checkpoint=False``), loadable on one device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from vitpeer.peer.core.config import ParallelConfig
from vitpeer.peer.core.config.preflight import (
    check_precision as check_precision,
)  # the one precision check, re-exported

log = logging.getLogger(__name__)


def device_type(accelerator: str) -> str:
    """``cuda`` or ``cpu``: where ``trainer.accelerator`` trains on this host; asking for a GPU on a host without one
    is an error, not a silent CPU run."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError("trainer.accelerator = 'gpu' but torch sees no CUDA GPU; use 'cpu' or 'auto'")
    return "cuda" if accelerator in ("gpu", "auto") and torch.cuda.is_available() else "cpu"


def lightning_strategy(parallel: ParallelConfig) -> Any:
    """What ``pl.Trainer(strategy=...)`` takes for ``parallel``."""
    if parallel.strategy == "ddp":
        return DDPStrategy()
    if parallel.strategy == "fsdp":
        return ModelParallelStrategy(
            data_parallel_size=parallel.devices * parallel.num_nodes,
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
        )
    return "auto"


def shard_model(net: nn.Module, mesh: DeviceMesh, min_params: int, reshard_after_forward: bool = True) -> int:
    """Apply ``fully_shard`` bottom-up: each submodule whose parameters not yet in a unit number ``min_params`` or more
    becomes a unit (as the classic size-based auto-wrap policy does), then the root takes the rest. Returns the
    number of units. A no-op (0) on a network that is already sharded, so ``configure_model`` may run twice."""
    if isinstance(net, FSDPModule):
        return 0
    units = 0

    def unsharded(module: nn.Module) -> int:
        nonlocal units
        count = sum(param.numel() for param in module.parameters(recurse=False))
        count += sum(unsharded(child) for child in module.children())
        if module is not net and count >= min_params:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
            units += 1
            return 0
        return count

    unsharded(net)
    fully_shard(net, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return units + 1


def sharder(parallel: ParallelConfig) -> Callable[[nn.Module, DeviceMesh], None] | None:
    """What ``ImageClassifier(shard=...)`` takes: ``shard_model`` with ``parallel``'s settings under fsdp, else None."""
    if parallel.strategy != "fsdp":
        return None
    return partial(_shard_and_say, min_params=parallel.fsdp_min_params, sharding=parallel.fsdp_sharding)


def _shard_and_say(net: nn.Module, mesh: DeviceMesh, min_params: int, sharding: str) -> None:
    units = shard_model(net, mesh, min_params, reshard_after_forward=sharding == "full_shard")
    if units and torch.distributed.get_rank() == 0:
        log.info("FSDP: %d units (%s) sharded over %d ranks", units, sharding, mesh.size())
