"""The sections of a run's configuration (model, data, optimizer, trainer, local devices, metrics), each a
pydantic model with every field documented under it; ``swarm.py`` holds the swarm's own section."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run, with one readable line per problem."""


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated. Each field's docstring is its
    description, and so the help of its command-line flag (``core.config.options``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    name: str = "vit_tiny_patch16_224"
    """timm model name, e.g. ``vit_base_patch16_224``, ``vit_base_patch32_224``, ``vit_tiny_patch16_224``."""
    img_size: int | None = Field(default=None, gt=0)
    """Input resolution; None keeps the model's own (224 for the ViT-B models)."""
    pretrained: bool = False
    """Load the model's pretrained weights from the Hugging Face hub (downloads; needs network or a warm cache)."""
    weights: Path | None = None
    """Local weights file (``.safetensors`` or ``.pth``) loaded instead of the hub; the classifier head is re-made."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra ``timm.create_model`` arguments, e.g. ``{patch_size: 4, depth: 6}`` for a CPU-sized ViT."""

    @model_validator(mode="after")
    def _one_weight_source(self) -> ModelConfig:
        if self.pretrained and self.weights is not None:
            raise ValueError("set either model.pretrained or model.weights, not both")
        return self


SOURCES = ("digits", "cifar10", "cifar100", "imagefolder")
"""The named data sources ``data.source`` takes, besides ``hf:<dataset name>`` (``core.data.sources`` loads them)."""
DATA_DIR_SOURCES = ("cifar10", "cifar100", "imagefolder")
"""Sources that read their files from ``data.data_dir`` and cannot run without it."""
DOWNLOADABLE = ("cifar10", "cifar100")
"""Sources that may fetch their files into ``data.data_dir`` (``data.download``); ``hf:`` too, into its cache."""


class DataConfig(Section):
    source: str = "digits"
    """``digits`` (embedded, no network), ``cifar10``, ``cifar100``, ``imagefolder`` or ``hf:<dataset name>``."""
    data_dir: Path | None = None
    """Local data directory: CIFAR's root, an ImageNet-style folder with train/ and val/, or a Hugging Face cache."""
    download: bool = False
    """Allow downloading the data set into ``data_dir`` (CIFAR, Hugging Face). Off: nothing is fetched."""
    batch_size: int = Field(default=32, gt=0)
    """Samples per local step on this peer (per device)."""
    augment: bool = True
    """Random resized crops (and flips, except for digits) on training images; off trains on the eval transform."""
    eval_batch_size: int | None = Field(default=None, gt=0)
    """Batch size for validation and test; None uses ``batch_size``."""
    num_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes; 0 loads in the training process (best for the small embedded set)."""
    val_fraction: float = Field(default=0.15, gt=0, lt=1)
    """Share of the training split held out for validation when the source has no validation split."""
    test_fraction: float = Field(default=0.15, gt=0, lt=1)
    """Share held out for the final test when the source has no test split (digits, imagefolder without test/)."""
    split_seed: int = 0
    """Seed of the fixed train/val/test split; the same on every peer so peers agree on what is held out."""

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in SOURCES or (value.startswith("hf:") and len(value) > 3):
            return value
        raise ValueError(f"unknown data source {value!r}; expected one of {', '.join(SOURCES)} or hf:<dataset name>")


class OptimConfig(Section):
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate of AdamW, reached after the warm-up."""
    weight_decay: float = Field(default=0.05, ge=0)
    """AdamW weight decay (not applied to biases and norm weights)."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up length in optimizer steps; in a swarm these are swarm steps (hivemind epochs)."""
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    """``cosine``: linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``trainer.max_steps``.
    ``onecycle``: cosine rise from ``lr / 25`` to ``lr`` over ``warmup_steps`` (30 % of the run when 0), then cosine
    decay to ``lr / 2.5e5`` (torch's OneCycleLR defaults). ``constant``: linear warm-up, then ``lr``."""
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    """Final learning rate of the cosine schedule as a share of ``lr``."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    """Cross-entropy label smoothing."""


class TrainerConfig(Section):
    max_steps: int = Field(default=100, gt=0)
    """Optimizer steps to train; in a swarm these are swarm steps (hivemind epochs), shared by all peers."""
    precision: Literal["32", "16-mixed", "bf16-mixed"] = "32"
    """Numerics: 32 (fp32), bf16-mixed (CPUs and Ampere+ GPUs), 16-mixed (GPU only, not in a swarm)."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Where to train; auto picks a GPU when one is visible."""
    threads: int | None = Field(default=None, gt=0)
    """torch's CPU threads in each process; unset: ``OMP_NUM_THREADS`` if set, else this process's share of the
    cores it may use, counted with the other vitpeer processes on them (``core.runtime.threads``)."""
    seed: int = 0
    """Seed of model initialisation (the same on every peer); each peer's data order is reseeded from its peer id."""
    val_every_n_epochs: int = Field(default=1, gt=0)
    """Validate after every this many passes over the local data."""
    log_every_n_steps: int = Field(default=10, gt=0)
    """Local steps between logged training metrics."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the gradient norm of each local step to this value; None disables clipping."""
    accumulate_grad_batches: int = Field(default=1, gt=0)
    """``vitpeer train``: local steps whose gradients add up before one optimizer step (a larger effective batch).
    A swarm already accumulates up to ``swarm.target_batch_size``: raise that instead; ``join`` refuses this."""
    early_stopping_patience: int | None = Field(default=None, gt=0)
    """``vitpeer train``: stop when ``val/loss`` has not improved for this many validations; unset (None), train on
    to ``max_steps``. A swarm step belongs to every peer, so ``join`` refuses this."""
    save_top_k: int = Field(default=1, ge=0)
    """Best checkpoints by ``val/loss`` kept as ``checkpoints/best-*.ckpt`` (older ones are deleted), next to
    ``last.ckpt``; 0 keeps only ``last.ckpt``."""
    load_best_at_end: bool = True
    """``vitpeer train``: test and export the best checkpoint by ``val/loss`` rather than the last weights (needs
    ``save_top_k`` >= 1). A peer tests its last weights: those are the swarm's."""
    progress_bar: bool | None = None
    """A live progress bar (swarm step, samples toward the target, peers, loss, lr, samples/s); unset (None), it is
    shown when the output is a terminal. One log line per swarm step is printed either way."""
    output_dir: Path = Path("outputs")
    """Run directory: resolved config, metrics CSV, checkpoints and results go here."""
    resume: Path | None = None
    """Lightning checkpoint to resume from (its hivemind epoch is restored too)."""


class ParallelConfig(Section):
    strategy: Literal["single", "ddp", "fsdp"] = "single"
    """How this host's devices (and, in ``vitpeer train``, nodes) share the work: ``single`` one device; ``ddp``
    every rank holds the model and gradients are all-reduced; ``fsdp`` parameters, gradients and optimizer state are
    sharded across ranks with FSDP2 ``fully_shard`` (ZeRO-3 style), gathered layer by layer when needed."""
    devices: int = Field(default=1, gt=0)
    """Processes (GPUs, or CPU processes with gloo) per node."""
    num_nodes: int = Field(default=1, gt=0)
    """Nodes of a ``vitpeer train`` run, each started with the same command (torchrun, MASTER_ADDR/NODE_RANK, srun)."""
    fsdp_sharding: Literal["full_shard", "shard_grad_op"] = "full_shard"
    """``full_shard`` frees each unit's gathered parameters after forward (least memory, ZeRO-3);
    ``shard_grad_op`` keeps them until backward (one all-gather fewer per step, more memory, ZeRO-2 style)."""
    fsdp_min_params: int = Field(default=5_000_000, gt=0)
    """Auto-wrap: every submodule holding at least this many parameters not already in a smaller unit becomes its own
    FSDP unit (gathered and freed on its own). 5M makes each ViT-B block a unit (7.1M; its linears are below 2.4M)."""

    @model_validator(mode="after")
    def _one_process_is_single(self) -> ParallelConfig:
        if self.strategy == "single" and self.devices * self.num_nodes > 1:
            raise ValueError(
                f"parallel.strategy = 'single' runs one process, but devices={self.devices} and "
                f"num_nodes={self.num_nodes}; choose 'ddp' or 'fsdp' for several"
            )
        return self


class MonitorConfig(Section):
    port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus metrics (GPU, training, averaging) on this port; 0 picks a free one (printed at start);
    unset (None), none is served. Pick your own, e.g. 9470 (9100, 9400 and 9835 belong to common exporters)."""
    addr: str = "127.0.0.1"
    """Interface of the metrics endpoint: this host only by default; 0.0.0.0 when Prometheus scrapes from elsewhere
    (a container, another host). The endpoint is read-only."""
