"""How many threads torch computes with on a CPU: this process's share of the cores it may use.

torch starts one intra-op thread per core in every process. Two peers on a 2-core host then run four compute threads,
besides their DHT, averager and p2pd threads, on two cores, and stall each other: measured 2026-12-06, such a pair
committed 3 swarm steps in 90 s, against 24 with one thread each. So every computing vitpeer process (a ``join`` or
``train`` rank) registers in ``REGISTRY`` (a file per process: its pid, start time and CPU set) and takes
``cores // sharers`` threads, where ``sharers`` counts the live registered processes whose CPU sets overlap its own,
itself included. ``ThreadShare`` counts again every ``RECHECK_S`` s while training, so a peer started first gives
threads back when another starts beside it, and takes them again when it leaves.

Processes in other containers or of other users are not seen: ``--threads`` (``trainer.threads``) or
``OMP_NUM_THREADS`` fixes the number instead, and then nothing is counted.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

REGISTRY = Path(tempfile.gettempdir()) / "vitpeer-compute"
"""One ``<pid>.json`` per computing vitpeer process on this host (``VITPEER_COMPUTE_REGISTRY`` moves it: tests)."""
RECHECK_S = 10.0
"""Seconds between two counts of the processes sharing this one's cores, while training."""


def registry() -> Path:
    return Path(os.environ.get("VITPEER_COMPUTE_REGISTRY", REGISTRY))


def _started(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22); None if it is gone. With
    the pid it names one process: a pid reused later starts at another time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class Choice:
    threads: int
    """Intra-op threads torch was set to."""
    cores: int
    """CPUs this process may run on (its affinity)."""
    sharers: int | None
    """Registered processes on those cores, this one included; None: the number was fixed (``why``)."""
    why: str
    """How the number was chosen, for the start-up lines."""

    def __str__(self) -> str:
        return f"{self.threads} threads ({self.why})"


class ThreadShare(pl.Callback):
    """Registers this process and keeps its torch threads at its share of its cores (module docstring)."""

    def __init__(self, fixed: int | None = None):
        self.fixed = fixed or _from_environment()
        self.cpus = frozenset(os.sched_getaffinity(0))
        self.path = registry() / f"{os.getpid()}.json"
        self.checked = 0.0
        if self.fixed is None:
            self._register()
        self.choice = self._choose()

    def _register(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "started": _started(os.getpid()), "cpus": sorted(self.cpus)}
        self.path.write_text(json.dumps(record))
        atexit.register(self.path.unlink, missing_ok=True)

    def sharers(self) -> int:
        """Live registered processes whose CPU sets overlap this one's, this one included; stale files removed."""
        count = 1
        for path in registry().glob("*.json"):
            if path == self.path:
                continue
            try:
                record = json.loads(path.read_text())
                pid, started, cpus = int(record["pid"]), record["started"], set(record["cpus"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written, or not ours
            if _started(pid) != started:
                path.unlink(missing_ok=True)  # its process ended without removing it (killed)
            elif cpus & self.cpus:
                count += 1
        return count

    def _choose(self) -> Choice:
        cores = len(self.cpus)
        if self.fixed is not None:
            threads, sharers, why = self.fixed, None, "fixed by --threads or OMP_NUM_THREADS"
        else:
            sharers = self.sharers()
            threads = max(1, cores // sharers)
            why = f"{cores} core(s) shared by {sharers} vitpeer process(es) here; --threads N to fix"
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return Choice(threads, cores, sharers, why)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        now = time.monotonic()
        if self.fixed is not None or now - self.checked < RECHECK_S:
            return
        self.checked = now
        before = self.choice.threads
        self.choice = self._choose()
        if self.choice.threads != before:
            log.info("now %s", self.choice)

    def close(self) -> None:
        """Unregister (also done at exit)."""
        self.path.unlink(missing_ok=True)


def _from_environment() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None
