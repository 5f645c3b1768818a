"""``vitpeer doctor``'s checks of this host: Python, torch and its GPUs, hivemind's import, free ports.

``Check`` is the one finding every check returns (``doctor_swarm`` returns them too). Nothing here starts a process
or opens a connection: torch and hivemind are imported inside the checks, so ``vitpeer doctor --help`` stays fast.
"""

from __future__ import annotations

import platform
import socket
import sys
from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "warn", "FAIL"]
HIVEMIND_TESTED = "1.1.12"


@dataclass(frozen=True)
class Check:
    """One finding. ``detail`` says what was found and, for warn and FAIL, what to do about it."""

    name: str
    status: Status
    detail: str


# --- this host: Python, torch, GPUs --------------------------------------------------------------------------------


def check_python() -> list[Check]:
    """The interpreter that will run vitpeer (an older one than 3.10 could not even import this command)."""
    return [Check("python", "ok", f"{platform.python_version()} ({sys.executable})")]


def check_torch() -> list[Check]:
    """torch's version, then CUDA with NCCL and every GPU, or bf16 on the CPU when no GPU is visible."""
    try:
        import torch
    except Exception as err:  # a broken install raises more than ImportError (OSError from a missing .so)
        return [Check("torch", "FAIL", f"does not import ({err}); install it: pip install 'torch>=2.4'")]
    checks = [Check("torch", "ok", torch.__version__)]
    if not torch.cuda.is_available():
        built = f"torch built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch build"
        advice = (
            f"have a GPU? check nvidia-smi, and that its driver supports CUDA {torch.version.cuda}"
            if torch.version.cuda
            else "have a GPU? install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
        )
        checks.append(Check("cuda", "warn", f"no CUDA GPU visible ({built}): training runs on CPU (slow); {advice}"))
        return checks + check_cpu_bf16()
    count = torch.cuda.device_count()
    checks.append(Check("cuda", "ok", f"CUDA {torch.version.cuda}, {count} GPU{'s' if count != 1 else ''} visible"))
    checks.append(check_nccl())
    for index in range(count):
        checks.append(check_gpu(index))
    return checks


def check_nccl() -> Check:
    """NCCL carries gradients between this host's GPUs when one peer uses several (``--local-strategy ddp``)."""
    from torch.cuda import nccl  # torch imports it on its way in, but its types do not show torch.cuda.nccl

    try:
        version = nccl.version()
    except Exception as err:  # torch built without NCCL
        return Check("nccl", "warn", f"not available ({err}); several GPUs in one peer need a torch build with NCCL")
    shown = ".".join(str(part) for part in version) if isinstance(version, tuple) else str(version)
    return Check("nccl", "ok", shown)


def check_gpu(index: int) -> Check:
    """A GPU's name, memory and bf16 support (``--precision bf16-mixed`` needs Ampere or newer)."""
    import torch

    props = torch.cuda.get_device_properties(index)
    with torch.cuda.device(index):
        bf16 = torch.cuda.is_bf16_supported()
    found = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}"
    if bf16:
        return Check(f"gpu {index}", "ok", f"{found}, bf16 supported")
    return Check(f"gpu {index}", "warn", f"{found}, no bf16: train with --precision 32 (bf16-mixed needs Ampere+)")


def check_cpu_bf16() -> list[Check]:
    """On a CPU, bf16-mixed is fine: run one tiny autocast matmul to be sure this CPU and torch build agree."""
    import torch

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            product = torch.ones(4, 4) @ torch.ones(4, 4)
        assert product.dtype == torch.bfloat16 and float(product[0, 0]) == 4.0
    except Exception as err:
        return [Check("bf16", "warn", f"bf16 autocast fails on this CPU ({err!r}): train with --precision 32")]
    return [Check("bf16", "ok", "bf16-mixed works on this CPU")]


# --- hivemind and vitpeer's swarm code import ----------------------------------------------------------------------


def check_hivemind() -> list[Check]:
    """hivemind imports, and is the version vitpeer is tested with."""
    try:
        import hivemind
    except Exception as err:
        advice = f"install it: pip install hivemind=={HIVEMIND_TESTED}"
        return [Check("hivemind", "FAIL", f"does not import ({err}); {advice}")]
    if hivemind.__version__ != HIVEMIND_TESTED:
        advice = f"vitpeer is tested with {HIVEMIND_TESTED}: pip install hivemind=={HIVEMIND_TESTED}"
        return [Check("hivemind", "warn", f"{hivemind.__version__}; {advice}")]
    return [Check("hivemind", "ok", hivemind.__version__)]


def check_swarm_module() -> list[Check]:
    """vitpeer's own swarm code imports (it brings in Lightning): nothing on this list, only a FAIL when it breaks."""
    try:
        import vitpeer.peer.core.swarm.dht  # noqa: F401
    except Exception as err:
        return [
            Check(
                "vitpeer",
                "FAIL",
                f"vitpeer.peer.core.swarm.dht does not import ({err!r}); reinstall vitpeer: pip install -e .",
            )
        ]
    return []


# --- ports ---------------------------------------------------------------------------------------------------------


def check_port(name: str, port: int | None, host: str, option: str) -> list[Check]:
    """A port given as ``option`` is free on ``host``: bind a TCP socket there (nothing when not given, or 0).

    ``SO_REUSEADDR`` as the p2p daemon and Prometheus' server use it: a port left in TIME_WAIT by a run that just
    ended is free for them, and so is it here; a port another program listens on is not.
    """
    if not port:
        return []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except PermissionError:
        return [Check(name, "FAIL", f"TCP {port} needs root (ports below 1024 are privileged); pick {option} 1024+")]
    except OSError as err:
        spare = _free_port_near(port, host)
        instead = f"{option} {spare}" if spare else f"another {option}"
        return [
            Check(
                name,
                "FAIL",
                f"TCP {port} is busy on {host} ({err.strerror}): another program (or a vitpeer still running) "
                f"holds it; stop it, or pick {instead}, or {option} 0 for any free port",
            )
        ]
    if option == "--host-port":
        return [Check(name, "ok", f"TCP {port} is free on {host}; others reach you only if your firewall lets it in")]
    return [Check(name, "ok", f"TCP {port} is free on {host}")]


def _free_port_near(port: int, host: str, tries: int = 20) -> int | None:
    """The first free port above ``port``, to suggest in place of a busy one."""
    for candidate in range(port + 1, min(port + 1 + tries, 65536)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, candidate))
            except OSError:
                continue
            return candidate
    return None
