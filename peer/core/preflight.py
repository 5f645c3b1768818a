"""Checks that run before a command writes or starts anything: what the user typed or pointed at must make sense.

``vitpeer join``, ``train`` and ``coordinator`` call these right after their config is built. Each check raises
``ConfigError`` with one line naming the key, the value and what would be right; the command line turns it into
exit code 2. Nothing here writes into the run directory (the writability probe removes what it made), so a refused
run leaves an existing run directory exactly as it was.

- ``check_run``: the model name, the data directory, the checkpoint to resume, the precision (``train``; a peer's
  is checked by ``commands.join.refuse_in_swarm``), for a peer the target batch and the listen ports, and last the
  output directory.
- ``check_checkpoint``: a file ``torch.load`` can open without unpickling code, holding a ``state_dict``
  (``vitpeer evaluate`` also accepts ``.safetensors``).
"""

from __future__ import annotations

import difflib
import errno
import os
import socket
import tempfile
import zipfile
from pathlib import Path

from vitpeer.peer.core.config import ConfigError, RunConfig, SwarmConfig

DATA_DIR_SOURCES = ("cifar10", "cifar100", "imagefolder")
"""Sources that read their files from ``data.data_dir`` and cannot run without it."""
DOWNLOADABLE = ("cifar10", "cifar100")
"""Sources that may fetch their files into ``data.data_dir`` (``data.download``); ``hf:`` too, into its cache."""


def check_run(config: RunConfig, *, swarm: bool) -> None:
    """Everything ``join`` (``swarm=True``) or ``train`` can refuse before it starts. Local ranks that Lightning
    starts for a DDP peer skip the port check: their leader already listens on it."""
    check_model(config.model.name)
    check_data_dir(config)
    if config.trainer.resume is not None:
        check_checkpoint(config.trainer.resume, "trainer.resume")
    if (
        not swarm
    ):  # a peer's precision is checked by vitpeer.peer.commands.join.refuse_in_swarm, with the swarm's own rules
        check_precision(config)
    if swarm:
        check_target_batch(config)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            check_listen_ports(config.swarm)
    check_writable(config.trainer.output_dir, "trainer.output_dir", "--output-dir")


def check_model(name: str) -> None:
    """A model timm can build; otherwise the closest names it knows."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models('vit_*')"
    raise ConfigError(f"model.name = {name!r} is not a timm model; {hint}")


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


def check_precision(config: RunConfig) -> None:
    """The numerics the device supports outside a swarm (``core.parallel.check_precision``), as a usage error."""
    from vitpeer.peer.core.parallel import check_precision as check
    from vitpeer.peer.core.parallel import device_type

    try:
        check(config.trainer.precision, device_type(config.trainer.accelerator), swarm=False)
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
