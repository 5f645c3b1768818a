"""Typed run configuration: one pydantic model per concern, every field documented under it.

Precedence is command line > YAML file > defaults. ``load_config`` reads a data-only YAML file from ``configs/``,
applies dotted overrides (``{"data.batch_size": 64}``) and validates the result; an error names the key, the value
and what is allowed.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import sys
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(str(files("vitpeer.configs")))
"""Where the experiment files ship (``vitpeer.configs``' package data); ``--config NAME`` without a path looks here."""


class ConfigError(ValueError):
    """A configuration that cannot run, with one readable line per problem."""


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated. Each field's docstring is its
    description, and so the help of its command-line flag (``core.options``)."""

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
        known = ("digits", "cifar10", "cifar100", "imagefolder")
        if value in known or (value.startswith("hf:") and len(value) > 3):
            return value
        raise ValueError(f"unknown data source {value!r}; expected one of {', '.join(known)} or hf:<dataset name>")


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


def split_peer_list(values: list[str] | tuple[str, ...]) -> list[str]:
    """Multiaddrs given repeatedly or separated by commas or spaces (as ``join`` and ``doctor`` take them), one list."""
    return [part for value in values for part in str(value).replace(",", " ").split()]


def peer_multiaddr_problem(addr: str) -> str | None:
    """Why ``addr`` is not a peer's full multiaddr (parsed as hivemind parses it, peer id included), or None."""
    if not addr.startswith("/") or "/p2p/" not in addr:
        return "no /p2p/PEER_ID part" if addr.startswith("/") else "a multiaddr starts with /"
    try:
        parsed = multiaddr_class()(addr)  # checks every part: the IP, a numeric port, a base58 multihash peer id
    except Exception as err:  # the parser's errors repeat the address: keep only the reason
        return re.sub(r"^Invalid MultiAddr '.*?'\s*:?\s*", "", str(err)) or type(err).__name__
    if "tcp" not in parsed and "udp" not in parsed:
        return "no /tcp/PORT part"
    return None


STANDALONE_MULTIADDR = "vitpeer_hivemind_multiaddr"


@cache
def multiaddr_class() -> type:
    """hivemind's ``Multiaddr`` (its own copy of py-multiaddr, which needs only base58, cid, netaddr and varint).
    Once hivemind is imported, that one; before, the same files loaded as a package of their own: importing
    ``hivemind.utils.multiaddr`` runs ``hivemind/__init__``, which imports torch, and a refused address should not
    wait for torch (README, When things go wrong, has how long refusals take)."""
    if "hivemind" in sys.modules:
        from hivemind.utils.multiaddr import Multiaddr

        return Multiaddr
    hivemind = importlib.util.find_spec("hivemind")
    if hivemind is None or not hivemind.submodule_search_locations:
        raise ModuleNotFoundError("hivemind is not installed")
    folder = Path(hivemind.submodule_search_locations[0]) / "utils" / "multiaddr"
    spec = importlib.util.spec_from_file_location(
        STANDALONE_MULTIADDR, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[STANDALONE_MULTIADDR] = package  # its modules import each other relatively, through this name
    spec.loader.exec_module(package)
    return package.Multiaddr


class SwarmConfig(Section):
    run_id: str = "vitpeer"
    """hivemind run id, used as given: peers with the same run id (and model) train together."""
    initial_peers: list[str] = Field(default_factory=list)
    """Multiaddrs of peers already in the swarm (``/ip4/1.2.3.4/tcp/31337/p2p/Qm...``), repeated or separated by
    commas or spaces: the way into the swarm. A peer without any starts a new swarm."""
    host_port: int = Field(default=0, ge=0, le=65535)
    """TCP port to listen on; 0 lets the OS pick one. Open it in your firewall so others can reach you."""
    host_maddrs: list[str] | None = None
    """Listen multiaddrs; unset (None), the peer listens on all IPv4 interfaces at ``host_port``."""
    announce_ip: str | None = None
    """Public IP to announce (behind NAT with a forwarded port); others dial this address."""
    announce_maddrs: list[str] = Field(default_factory=list)
    """Full announce multiaddrs, when ``announce_ip`` is not enough."""
    identity_path: Path | None = None
    """Private key file giving this peer a stable peer id (and so a stable address) across restarts; created on the
    first start. Unset (None): ``identity.key`` in the run's output directory (``vitpeer join``)."""
    client_mode: bool = False
    """Do not accept incoming connections (peer behind a firewall without a forwarded port); uses others to average."""
    use_relay: bool = True
    """Let unreachable peers connect through this one (libp2p circuit relay)."""
    use_auto_relay: bool = False
    """Look for relays automatically and be reachable through them (behind NAT)."""
    target_batch_size: int = Field(default=256, gt=0)
    """Samples the whole swarm accumulates before all peers take one optimizer step (one swarm step)."""
    matchmaking_time: float = Field(default=3.0, gt=0)
    """Seconds to wait for peers to form an averaging group. Raise it on slow or far-apart networks."""
    averaging_timeout: float = Field(default=30.0, gt=0)
    """Seconds before an averaging round is given up and the peer steps with its local gradients."""
    load_state_timeout: float = Field(default=60.0, gt=0)
    """Deadline for downloading the swarm's state when joining or after falling behind; then train from local state."""
    algorithm: Literal["diloco", "gradient"] = "diloco"
    """How the peers train together. ``diloco``: each peer trains alone with its own optimizer for a swarm step, then
    the peers average how far they moved (the pseudo-gradient) in the background and an outer optimizer steps the
    shared parameters; little traffic, no waiting while a round runs. ``gradient``: the peers average gradients
    every swarm step and all take the same optimizer step (hivemind.Optimizer); traffic every swarm step."""
    outer_lr: float = Field(default=0.7, gt=0)
    """``diloco``: learning rate of the outer optimizer (SGD with Nesterov momentum) on the averaged pseudo-gradient.
    1.0 with no momentum would simply average the peers' parameters."""
    outer_momentum: float = Field(default=0.9, ge=0, lt=1)
    """``diloco``: Nesterov momentum of the outer optimizer."""
    sync_every: int = Field(default=16, gt=0)
    """``diloco``: swarm steps between exact (fp32) averagings of the shared parameters and outer momentum, which
    undo the rounding that compressed rounds leave between peers; also at step 1, at the last step, and after a
    round that did not average a peer with every peer it counts."""
    compression: Literal["none", "fp16", "8bit"] | None = None
    """What averaged tensors travel as: ``none`` (fp32), ``fp16`` (half the bytes) or ``8bit`` (a quarter: blockwise
    absmax int8, vitpeer's own codec). Unset: fp16 for ``diloco``'s pseudo-gradients, none for ``gradient``."""

    @property
    def wire_compression(self) -> str:
        """``compression``, or the algorithm's default when unset."""
        if self.compression is not None:
            return self.compression
        return "fp16" if self.algorithm == "diloco" else "none"

    local_updates: bool = False
    """Apply local gradients every step and only average parameters each swarm step (fewer bytes, noisier)."""
    average_state_every: int = Field(default=1, gt=0)
    """Swarm steps between rounds that average parameters (hivemind's ``average_state_every``; the last swarm step
    always has one). Each round is a full all-reduce of the model: rounds further apart save that time per swarm
    step, but let the peers' parameters drift apart in between, and a peer that joins or restarts loads state that
    was averaged longer ago. README, Performance, has what we measured both ways."""
    overlap: bool = False
    """Average gradients and run the optimizer in the background while the next batches compute
    (hivemind's delayed parameter updates): parameters lag one swarm step, the peer waits less.
    Experimental and off by default: with two or more peers the swarm does not learn with it yet; a peer started
    with it warns so. README, known limits, has what we found."""
    progress_expiration: float = Field(default=20.0, gt=0)
    """Seconds a peer's progress report lives in the DHT (hivemind's default is 60). A peer that crashed still counts
    as present this long, and a peer restarted after everyone left waits this long before it trains on."""
    startup_timeout: float = Field(default=30.0, gt=0)
    """Seconds the p2p daemon may take to start, its first dial of ``initial_peers`` included: with hivemind's 3 s
    ping after it, the longest a peer waits for initial peers that do not answer (README, When things go wrong, has
    how long that takes for a closed port and for a silent one)."""

    @field_validator("initial_peers", mode="before")
    @classmethod
    def _split_peer_list(cls, value: Any) -> Any:
        """Accept a comma- or space-separated string as well as a list (the old Lightning strategy did not)."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            return split_peer_list(value)
        return value

    @field_validator("initial_peers")
    @classmethod
    def _multiaddrs(cls, value: list[str]) -> list[str]:
        for addr in value:
            problem = peer_multiaddr_problem(addr)
            if problem is not None:
                which = f"{addr!r} is" if len(value) > 1 else "is"  # one address: the key's value shows it
                raise ValueError(
                    f"{which} not a peer multiaddr ({problem}); expected /ip4/HOST/tcp/PORT/p2p/PEER_ID, "
                    "as the first peer prints it"
                )
        return value

    @model_validator(mode="after")
    def _compatible_modes(self) -> SwarmConfig:
        if self.local_updates and self.overlap:
            raise ValueError("swarm.local_updates averages no gradients, so swarm.overlap must be false with it")
        if self.algorithm == "diloco" and (self.local_updates or self.overlap):
            which = "local_updates" if self.local_updates else "overlap"
            raise ValueError(
                f"swarm.{which} is an option of the gradient algorithm; diloco always steps locally and averages in "
                "the background: leave it false, or set swarm.algorithm = 'gradient'"
            )
        return self


class TrainerConfig(Section):
    max_steps: int = Field(default=100, gt=0)
    """Optimizer steps to train; in a swarm these are swarm steps (hivemind epochs), shared by all peers."""
    precision: Literal["32", "16-mixed", "bf16-mixed"] = "32"
    """Numerics: 32 (fp32), bf16-mixed (CPUs and Ampere+ GPUs), 16-mixed (GPU only, not in a swarm)."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Where to train; auto picks a GPU when one is visible."""
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


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)

    def save(self, path: Path) -> None:
        """Write the resolved config as YAML (loadable again with ``load_config``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())

    def write_to(self, run_dir: Path) -> None:
        """The run directory's ``config.yaml`` (``--config`` takes it back) and ``config.json`` (for tools)."""
        self.save(run_dir / "config.yaml")
        (run_dir / "config.json").write_text(self.model_dump_json(indent=2) + "\n")

    def for_peers(self) -> RunConfig:
        """What every peer of the run shares: this config without this host's addresses, identity and paths."""
        host_specific = {"initial_peers", "host_port", "host_maddrs", "announce_ip", "announce_maddrs"}
        host_specific |= {"identity_path", "client_mode", "use_auto_relay"}
        swarm = SwarmConfig(**self.swarm.model_dump(exclude=host_specific))
        trainer = TrainerConfig(**self.trainer.model_dump(exclude={"output_dir", "resume", "accelerator"}))
        local = {"monitor": MonitorConfig(), "parallel": ParallelConfig()}  # this host's exporter and devices
        return self.model_copy(update={"swarm": swarm, "trainer": trainer, **local})


def resolve_config_path(name: str | Path, beside: Path | None = None) -> Path:
    """A path as given, or a file of ``configs/`` named with or without ``.yaml``. ``beside``: the folder of the file
    whose ``base:`` this is, looked in first instead of the working directory (a base next to its file is found
    wherever the command runs)."""
    path = Path(name)
    first = [beside / path, beside / f"{path}.yaml"] if beside is not None else [path]
    for candidate in (*first, CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(str(name), shipped, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"config file {str(name)!r} not found; {hint}shipped configs: {', '.join(shipped)}")


def _read_with_bases(text: str, source: str, beside: Path | None, below: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping ``text`` (read from ``source``) over its ``base:`` file, and that one's over its own: mappings
    merge key by key at every depth, any other value (a list, a number, a string) replaces the base's. ``beside``:
    the folder of the file; None (YAML from the network) may name no base. ``below``: the files that named this one."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}{where}: not valid YAML ({reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    if "base" not in data:
        return data
    name = data.pop("base")
    if beside is None:  # a config from a coordinator reads no file of this host
        raise ConfigError(f"base = {name!r}: only a config file can name a base ({source})")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"base = {name!r}: expected the name or path of a config file ({source})")
    try:
        path = resolve_config_path(name, beside)
    except ConfigError as err:
        raise ConfigError(f"base = {name!r}: {err} ({source})") from None
    chain = (*below, Path(source).resolve())
    if path.resolve() in chain:
        cycle = " -> ".join(file.name for file in (*chain, path.resolve()))
        raise ConfigError(f"base = {name!r}: the bases form a cycle, {cycle} ({source})")
    merged = _read_with_bases(path.read_text(), str(path), path.parent, chain)
    pending = [(merged, data)]
    while pending:
        under, over = pending.pop()
        for key, value in over.items():
            if isinstance(under.get(key), dict) and isinstance(value, dict):
                pending.append((under[key], value))
            else:
                under[key] = value
    return merged


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    text: str | None = None,
    source: str = "",
) -> RunConfig:
    """Validate YAML (a file ``path``, or ``text`` read from ``source``) with dotted ``overrides`` applied on top.

    A file may start from another: ``base: NAME`` (a shipped config's name, or a path relative to the file) merges
    the file over that one before validation, the way ``cifar10_vit_b32_ddp`` builds on ``cifar10_vit_b32``; bases
    may have bases. The result, with no ``base`` left, is what a run saves as its ``config.yaml``. Neither ``path``
    nor ``text``: the defaults. Raises ConfigError naming the key, the value and the rule (and the file).
    """
    beside = None
    if path is not None:
        resolved = resolve_config_path(path)
        text, source, beside = resolved.read_text(), str(resolved), resolved.parent
    source = source or "defaults"
    data = _read_with_bases(text or "", source, beside)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return validated(RunConfig, data, source)


def validated(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """``model`` built from ``data``, or a ConfigError with one line per problem (key = value: rule), the first
    naming the first problem and ``source``."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            shown = "" if problem["type"] in ("missing", "extra_forbidden") else f" = {problem.get('input')!r}"
            rule = problem["msg"].removeprefix("Value error, ")
            if problem["type"] == "extra_forbidden":
                rule = _unknown_key(model, problem["loc"])
            lines.append(f"{key}{shown}: {rule}")
        raise ConfigError(f"{lines[0]} ({source})" + "".join(f"\n  {line}" for line in lines[1:])) from None


def _unknown_key(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """'unknown key', with the close matches among the keys its section takes."""
    section = model
    for part in loc[:-1]:
        field = section.model_fields.get(str(part)) if isinstance(section, type) else None
        section = field.annotation if field is not None else None
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return "unknown key"
    known = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}known: {', '.join(known)}"
