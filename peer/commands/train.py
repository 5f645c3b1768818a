"""``vitpeer train``: the same experiments without a swarm, on one device, or with DDP or FSDP over nodes.

The command is started once per node and Lightning finds its place in the cluster from the environment:

- ``torchrun --nnodes M --nproc-per-node N -m vitpeer.peer.cli train ...``: torchrun's variables, a process per device;
- ``MASTER_ADDR=host0 MASTER_PORT=29500 NODE_RANK=i vitpeer train --devices N --num-nodes M``: Lightning starts the
  node's N processes itself;
- ``srun`` under Slurm (``--ntasks-per-node N``): Slurm's variables.

One run, top to bottom: model and data -> ``pl.Trainer`` with the parallel strategy (``core.model.parallel``) -> fit ->
validate and test -> the final weights (``model.safetensors``, written by every node's first process, so each node
keeps its copy) and ``all_results.json`` (global rank 0) with the numbers that compare DDP and FSDP side by side:
epoch time, samples/s, peak GPU memory allocated and reserved, accuracy. The Trainer's arguments, the callbacks every
run records with and the results file are shared with ``vitpeer join`` (``commands.fit``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.strategies import ModelParallelStrategy
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vitpeer.peer.commands.fit import RunStats, best_checkpoint, run_callbacks, trainer_args, write_results
from vitpeer.peer.core.config import RunConfig
from vitpeer.peer.core.data import VisionDataModule, num_classes
from vitpeer.peer.core.model import ImageClassifier, build_model, image_config
from vitpeer.peer.core.model.parallel import check_precision, device_type, lightning_strategy, sharder
from vitpeer.peer.core.runtime.threads import ThreadShare

log = logging.getLogger(__name__)


def save_final_weights(trainer: pl.Trainer, module: ImageClassifier, path: Path) -> None:
    """The trained network's full state dict as safetensors: under FSDP gathered to global rank 0 (every rank takes
    part), otherwise written by each node's first process from its own replica."""
    if isinstance(trainer.strategy, ModelParallelStrategy):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # torch types the values as any state's (ints, lists...); a model's state dict holds tensors only
        state: dict[str, torch.Tensor] = get_model_state_dict(module.net, options=options)  # pyright: ignore[reportAssignmentType]
        writer = trainer.is_global_zero
    else:
        state, writer = module.net.state_dict(), trainer.local_rank == 0
    if writer:
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}, str(path))


class _LogLearningRate(pl.Callback):
    """``lr`` at every step, for the history and the bar (in a swarm the strategy logs the swarm's)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        pl_module.log("lr", trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)


def run_train(config: RunConfig, extra_callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any] | None:
    """Train ``trainer.max_steps`` optimizer steps, validate, test, save; return the results on global rank 0.

    ``extra_callbacks``: Lightning callbacks added after the run's own (a benchmark's clock, a test's fault): the way
    to extend a run without replacing any of its functions."""
    out, parallel = config.trainer.output_dir, config.parallel
    check_precision(config.trainer.precision, device_type(config.trainer.accelerator), swarm=False)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(config.trainer.seed, workers=True, verbose=False)  # same initial weights on every rank
    threads = ThreadShare(config.trainer.threads)  # this process's share of the cores, before anything computes

    classes = num_classes(config.data)
    net = build_model(config.model, classes)
    data = VisionDataModule(config.data, image_config(net, config.model), order_seed=config.trainer.seed)
    module = ImageClassifier(net, classes, config.optim, config.trainer.max_steps, shard=sharder(parallel))
    stats = RunStats()
    callbacks = [*run_callbacks(config), stats, threads, _LogLearningRate()]
    if config.trainer.early_stopping_patience:
        callbacks.append(EarlyStopping("val/loss", patience=config.trainer.early_stopping_patience, mode="min"))
    callbacks += extra_callbacks
    trainer = pl.Trainer(
        strategy=lightning_strategy(parallel),
        accelerator=config.trainer.accelerator,
        num_nodes=parallel.num_nodes,
        callbacks=callbacks,
        **trainer_args(config),
    )
    if trainer.is_global_zero:
        config.write_to(out)
        log.info(
            "training %s with %s on %d process(es) (%d node(s) x %d); CPU: %s",
            config.model.name,
            parallel.strategy,
            trainer.world_size,
            parallel.num_nodes,
            parallel.devices,
            threads.choice,
        )
    trainer.fit(module, datamodule=data, ckpt_path=config.trainer.resume, weights_only=True)  # never unpickle code
    summary = stats.summary(trainer)
    best = best_checkpoint(trainer) if config.trainer.load_best_at_end else ""
    evaluated = best or None  # None: the weights in memory, the last ones
    validated = trainer.validate(module, datamodule=data, ckpt_path=evaluated, verbose=False)[0]
    tested = trainer.test(module, datamodule=data, ckpt_path=evaluated, verbose=False)[0]
    save_final_weights(trainer, module, out / "model.safetensors")  # after test: the evaluated weights
    if not trainer.is_global_zero:
        return None
    results = {
        "strategy": parallel.strategy,
        "world_size": trainer.world_size,
        "num_nodes": parallel.num_nodes,
        "devices": parallel.devices,
        "precision": config.trainer.precision,
        "global_step": trainer.global_step,
        "stopped_early": trainer.global_step < config.trainer.max_steps,
        **summary,
        "eval_loss": validated["val/loss"],
        "eval_accuracy": validated["val/acc"],
        "test_loss": tested["test/loss"],
        "test_accuracy": tested["test/acc"],
        "evaluated_checkpoint": str(Path(best).relative_to(out.resolve())) if best else "last weights",
    }
    write_results(out, results)
    log.info(
        "test accuracy %.4f after %d steps; %.0f samples/s",
        results["test_accuracy"],
        results["global_step"],
        results["train_samples_per_second"] or 0,
    )
    return results
