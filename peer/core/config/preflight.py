"""Checks that run before a command writes or starts anything: what the user typed or pointed at must make sense.

``vitpeer join``, ``train`` and ``coordinator`` call these right after their config is built. Each check raises
``ConfigError`` with one line naming the key, the value and what would be right; the command line turns it into
exit code 2. Nothing here writes into the run directory (the writability probe removes what it made), so a refused
run leaves an existing run directory exactly as it was.

- ``check_run``: the model name, the data directory, the checkpoint to resume, the precision, for a peer the target
  batch and the listen ports, and last the output directory.
- ``check_checkpoint``: a file ``torch.load`` can open without unpickling code, holding a ``state_dict``
  (``vitpeer evaluate`` also accepts ``.safetensors``).
- ``check_precision``: the one precision check; the strategies run it again on the device they got.

They import neither timm nor Lightning, and torch only where the answer needs it (a zip file to open as a
checkpoint, a precision that depends on the GPU), so a refusal does not wait for them.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import re
import socket
import tempfile
import zipfile
from functools import cache
from pathlib import Path

from vitpeer.peer.core.config import ALGORITHMS, ConfigError, RunConfig, SwarmConfig, algorithm_named
from vitpeer.peer.core.config.sections import DATA_DIR_SOURCES, DOWNLOADABLE


def check_run(config: RunConfig, *, swarm: bool) -> None:
    """Everything ``join`` (``swarm=True``) or ``train`` can refuse before it starts. Local ranks that Lightning
    starts for a DDP peer skip the port check: their leader already listens on it."""
    check_model(config.model.name)
    check_data_dir(config)
    if config.trainer.resume is not None:
        check_checkpoint(config.trainer.resume, "trainer.resume")
    check_precision(config.trainer.precision, config.trainer.accelerator, swarm=swarm)
    if swarm:
        check_swarm_trainer(config)
        check_target_batch(config)
        if config.trainer.resume is not None:
            check_resume_algorithm(config.trainer.resume, config.swarm.algorithm)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            check_listen_ports(config.swarm)
    check_writable(config.trainer.output_dir, "trainer.output_dir", "--output-dir")


def check_swarm_trainer(config: RunConfig) -> None:
    """What ``vitpeer train`` offers and a swarm cannot do, refused with the reason and what to set instead."""
    trainer = config.trainer
    if trainer.accumulate_grad_batches != 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches = {trainer.accumulate_grad_batches}: in a swarm the peers already "
            f"accumulate gradients until they reach swarm.target_batch_size ({config.swarm.target_batch_size}) "
            "samples together; raise that instead and leave accumulate_grad_batches at 1"
        )
    if trainer.early_stopping_patience is not None:
        raise ConfigError(
            "trainer.early_stopping_patience: a swarm step belongs to every peer, so one peer cannot stop the run "
            "early; set trainer.max_steps (or stop a volunteer with Ctrl-C) instead"
        )
    algorithm = algorithm_named(config.swarm.algorithm)
    if config.parallel.strategy not in algorithm.local_strategies:
        others = [name for name in ALGORITHMS if config.parallel.strategy in algorithm_named(name).local_strategies]
        raise ConfigError(
            f"parallel.strategy = {config.parallel.strategy!r}: the {algorithm.name} algorithm runs with "
            f"{', '.join(algorithm.local_strategies)} only; use --local-strategy "
            f"{algorithm.local_strategies[0]}" + (f", or --algorithm {' or '.join(others)}" if others else "")
        )


def check_model(name: str) -> None:
    """A model timm can build, as ``timm.is_model`` says it (the architecture; a pretrained tag such as
    ``.augreg_in21k`` is timm's to resolve when it builds the model); otherwise the closest names it knows."""
    models, deprecated = timm_models()
    architecture = name.split(".", 1)[0]
    if architecture in models or architecture in deprecated:
        return
    close = difflib.get_close_matches(name, sorted(models), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models('vit_*')"
    raise ConfigError(f"model.name = {name!r} is not a timm model; {hint}")


TIMM_ENTRYPOINT = re.compile(r"^@register_model\s*\n(?:@.*\n)*def (\w+)\(", re.MULTILINE)
TIMM_DEPRECATIONS = re.compile(r"register_model_deprecations\(\s*__name__\s*,\s*\{(.*?)\}\s*\)", re.DOTALL)
TIMM_DEPRECATED_NAME = re.compile(r"""['"](\w+)['"]\s*:""")


@cache
def timm_models() -> tuple[frozenset[str], frozenset[str]]:
    """The architectures the installed timm registers (``timm.list_models()``) and the deprecated names it still
    builds, read from its source files instead of importing it (timm imports torch). timm registers an
    architecture with ``@register_model`` on its function in ``timm/models/``, and a deprecated name as a key of
    ``register_model_deprecations(__name__, {...})``. ``tests/peer/test_bad_input.py`` holds both sets against the
    installed timm's own lists. If its files no longer read that way, timm is imported after all."""
    spec = importlib.util.find_spec("timm")  # finds the package without running it
    folders = spec.submodule_search_locations if spec is not None else None
    models: set[str] = set()
    deprecated: set[str] = set()
    for path in sorted(Path(folders[0]).joinpath("models").rglob("*.py")) if folders else []:
        text = path.read_text(encoding="utf-8")
        if "register_model" in text:
            models.update(TIMM_ENTRYPOINT.findall(text))
            for block in TIMM_DEPRECATIONS.findall(text):
                deprecated.update(TIMM_DEPRECATED_NAME.findall(block))
    if not models:
        import timm

        listed = set(timm.list_models())
        return frozenset(listed), frozenset(name for name in timm.models.get_deprecated_models() if name not in listed)
    return frozenset(models - deprecated), frozenset(deprecated)


def check_data_dir(config: RunConfig) -> None:
    """``data.data_dir`` exists when the source reads it, unless the data is to be downloaded into it."""
    data = config.data
    if data.source in DATA_DIR_SOURCES and data.data_dir is None:
        raise ConfigError(
            f"data.source = {data.source!r} reads its files from data.data_dir, which is not set; "
            "pass --data-dir (only digits needs none)"
        )
    if data.data_dir is None or data.source == "digits":
        return
    downloadable = data.source in DOWNLOADABLE or data.source.startswith("hf:")
    path = Path(data.data_dir).expanduser()
    if path.is_dir() or (data.download and downloadable):
        return
    fix = "pass --download to fetch it there, or " if downloadable else ""
    what = "is not a directory" if path.exists() else "does not exist"
    raise ConfigError(f"data.data_dir = {str(data.data_dir)!r} {what}; {fix}point --data-dir at the data's folder")


def check_checkpoint(path: Path, key: str) -> None:
    """``path`` is a checkpoint: a Lightning ``.ckpt`` (a torch zip archive with a ``state_dict``, opened with
    ``weights_only=True`` and memory-mapped, so nothing big is read and no code is unpickled) or a ``.safetensors``
    file whose header reads."""
    shown = f"{key} = {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{shown}: no such file" if not path.exists() else f"{shown} is not a file")
    try:
        problem = _checkpoint_problem(path)
    except Exception as err:  # torch, zipfile and safetensors raise many types for a truncated or foreign file
        reason = (str(err).strip().splitlines() or [""])[0]
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        problem = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    if problem is not None:
        raise ConfigError(f"{shown} is not a readable checkpoint ({problem})")


def check_resume_algorithm(path: Path, algorithm: str) -> None:
    """A swarm checkpoint resumes only under the algorithm that wrote it: their swarm optimizers keep different
    states (diloco: the inner optimizer and the outer state; gradient: hivemind's offloaded optimizer)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    optimizer = (state.get("optimizer_states") or [None])[0]
    if not isinstance(optimizer, dict):
        return
    writers = [name for name in ALGORITHMS if algorithm_named(name).wrote(optimizer)]
    if not writers:
        return  # not a swarm's optimizer (a `vitpeer train` checkpoint)
    written_by = writers[0]
    if written_by != algorithm:
        raise ConfigError(
            f"trainer.resume = {str(path)!r} was written by a {written_by} swarm, but this run's swarm.algorithm is "
            f"{algorithm!r}: resume it with --algorithm {written_by}, or start this run without --resume"
        )


def _checkpoint_problem(path: Path) -> str | None:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
        return None
    if not zipfile.is_zipfile(path):
        return "not the zip archive torch.save writes: cut short, or another kind of file"
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or "state_dict" not in state:
        return "no state_dict in it, as a Lightning checkpoint has"
    return None


def check_precision(precision: str, device: str, *, swarm: bool) -> None:
    """``trainer.precision`` can run on ``device``, in a swarm (``swarm``) or not: one line with the way out
    otherwise, before any process, port or download is spent on the run. ``device`` is ``trainer.accelerator``
    (auto, cpu, gpu) before the run, or the torch device type (cpu, cuda) a strategy got. torch is imported only when
    the answer depends on the GPU."""
    if precision == "16-mixed" and swarm:
        raise ConfigError(
            "precision '16-mixed' is not supported in a swarm: its loss scaling would have to run inside hivemind's "
            "delayed steps. Use 'bf16-mixed' (CPUs, Ampere and newer GPUs) or '32'."
        )
    if device == "gpu" or (device == "auto" and precision != "32"):
        import torch

        if device == "gpu" and not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator = 'gpu' but torch sees no CUDA GPU; use 'cpu' or 'auto'")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "16-mixed" and device == "cpu":
        raise ConfigError(
            "precision '16-mixed' (fp16 autocast with loss scaling) needs a CUDA GPU; on CPU use 'bf16-mixed' or '32'"
        )
    if precision == "bf16-mixed" and device == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name()
            raise ConfigError(f"precision 'bf16-mixed': this GPU ({name}) has no bf16; use '16-mixed' or '32'")


def check_target_batch(config: RunConfig) -> None:
    """The swarm's target is at least one local step of this peer; below it the swarm steps on every batch."""
    local = config.data.batch_size * config.parallel.devices
    target = config.swarm.target_batch_size
    if target < local:
        raise ConfigError(
            f"swarm.target_batch_size = {target} is below this peer's {local} samples per local step "
            f"(data.batch_size {config.data.batch_size} x parallel.devices {config.parallel.devices}): the swarm "
            f"would step on every local batch; raise --target-batch-size to at least {local} or lower --batch-size"
        )


def check_listen_ports(swarm: SwarmConfig, prefix: str = "swarm.") -> None:
    """The TCP ports the p2p daemon will listen on are free (port 0: any free port, nothing to check). ``prefix``
    names the keys as the command knows them (``swarm.host_port``; the coordinator's ``host_port``)."""
    if swarm.host_maddrs is None:
        if swarm.host_port:
            check_port_free("0.0.0.0", swarm.host_port, f"{prefix}host_port = {swarm.host_port}", "--host-port")
        return
    for maddr in swarm.host_maddrs:
        parts = maddr.strip("/").split("/")
        if len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp" and parts[3].isdigit():
            if int(parts[3]):
                check_port_free(parts[1], int(parts[3]), f"{prefix}host_maddrs = {maddr!r}", "--host-maddr")


def check_port_free(host: str, port: int, shown: str, flag: str) -> None:
    """Bind ``host:port`` for a moment. SO_REUSEADDR is on, as servers set it: a port only in TIME_WAIT after a
    restart counts as free, while any socket listening on it (on this address or on all of them) refuses the bind.
    Without SO_REUSEPORT, a p2p daemon's listener (which sets it) refuses us too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{shown} is already in use (another vitpeer?); choose another {flag}, or 0 for any free port"
                ) from None
            raise ConfigError(f"{shown}: cannot listen there ({err.strerror}); choose another {flag}") from None


def check_writable(path: Path, key: str, flag: str) -> None:
    """``path`` is (or can become) a directory this user writes to: create it and a temporary file in it, then
    remove both (only the folders this check created), so a refused run leaves no trace."""
    path = Path(path).expanduser()
    created = []
    for folder in [path, *path.parents]:
        if folder.exists() or folder == folder.parent:
            break
        created.append(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".vitpeer-write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        blocker = next((str(f) for f in [*reversed(path.parents), path] if f.exists() and not f.is_dir()), None)
        detail = f"{blocker} is a file, not a folder" if blocker else reason
        raise ConfigError(
            f"{key} = {str(path)!r} cannot be written ({detail}); choose a folder you can write to ({flag})"
        ) from None
    finally:
        for folder in created:  # deepest first; rmdir only removes what is still empty
            try:
                folder.rmdir()
            except OSError:
                break
