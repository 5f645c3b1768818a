"""Checkpoints on disk: written atomically, committed by a sidecar, pruned to the newest K plus the best.

Layout of ``<state-dir>/checkpoints/``::

    step_00000120.pt     torch.save(SwarmState.state_dict()): "algorithm", "model", "swarm_epoch", and the
                         algorithm's own: "optimizer" (gradient) or "outer_momentum" (diloco)
    step_00000120.json   the sidecar, written last: swarm epoch, samples seen, peers, config hash, time, size,
                         sha256, validation loss and accuracy. A .pt without its sidecar is incomplete.
    *.tmp                a write in progress, or one cut off by a crash: removed at start, never loaded

One write: serialize into memory, write ``<name>.tmp`` (1 MiB at a time), fsync it, rename it into place and fsync
the directory; the sidecar follows the same way, and only then are older checkpoints pruned (sidecar first). A write
that fails (a full disk) removes its ``.tmp`` and the uncommitted checkpoint file, and prunes nothing. Loading checks
the size and sha256 the sidecar recorded, and falls back to the next older checkpoint when they do not match; the
best is the evaluated checkpoint (a finite ``val_accuracy``) with the highest accuracy whose sha256 matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm.models
import torch
from torch import nn

log = logging.getLogger(__name__)

CHUNK = 1 << 20
CHUNK_DELAY_ENV = "VITPEER_TEST_CHECKPOINT_CHUNK_DELAY"
"""Seconds to pause after each written MiB. For fault-injection tests only (a SIGKILL in the middle of a write)."""
RESULTS = "all_results.json"
"""The export's scores and provenance (``export_for_timm``), written last: the mark of a finished export."""


def _fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` (a rename, a new or removed file) survive a power cut."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise OSError(err.errno, f"syncing the directory {directory} failed ({err.strerror or err})") from err


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds either its old content or all of ``data``, whatever happens to this process meanwhile; when
    this returns, both the bytes and the name are on disk. A write that fails (a full disk) removes its ``.tmp`` and
    raises an OSError naming ``path``."""
    delay = float(os.environ.get(CHUNK_DELAY_ENV, "0"))
    partial = path.with_name(path.name + ".tmp")
    try:
        with partial.open("wb") as sink:
            for start in range(0, len(data), CHUNK):
                sink.write(data[start : start + CHUNK])
                if delay:
                    sink.flush()
                    time.sleep(delay)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(partial, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
            raise OSError(err.errno, f"writing {path} failed ({reason}): it keeps its previous content") from err
        raise
    _fsync_dir(path.parent)  # the rename itself, not only the bytes


@dataclass(frozen=True)
class Written:
    """A checkpoint file in place, not yet committed by its sidecar."""

    path: Path
    sha256: str
    bytes: int
    write_seconds: float


class CheckpointStore:
    """``directory``'s checkpoints; ``keep_last`` newest complete ones survive pruning, and so does the best."""

    def __init__(self, directory: Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last = {keep_last}: keep at least the newest checkpoint (1)")
        self.directory, self.keep_last = directory, keep_last
        self.hashed: dict[str, tuple[tuple[int, int, str], bool]] = {}  # file -> (size, mtime, sha256), it matched
        directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def name(epoch: int) -> str:
        return f"step_{epoch:08d}"

    def remove_partial(self) -> list[Path]:
        """Delete writes a crash cut off: ``*.tmp`` files and checkpoint files that never got their sidecar."""
        removed = list(self.directory.glob("*.tmp"))
        removed += [pt for pt in self.directory.glob("step_*.pt") if not pt.with_suffix(".json").is_file()]
        for path in removed:
            log.warning("removing %s: a write that did not complete (the previous run was stopped during it)", path)
            path.unlink()
        return removed

    def save(self, state: dict[str, Any]) -> Written:
        """Write ``state`` (with its ``swarm_epoch``) as the checkpoint file; commit it later with ``commit``."""
        started = time.monotonic()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        path = self.directory / f"{self.name(state['swarm_epoch'])}.pt"
        try:
            write_atomic(path, data)
        except BaseException:
            if not path.with_suffix(".json").exists():  # renamed, but its directory failed to sync: never committed
                path.unlink(missing_ok=True)
            raise
        return Written(path, hashlib.sha256(data).hexdigest(), len(data), round(time.monotonic() - started, 3))

    def commit(self, written: Written, meta: dict[str, Any]) -> dict[str, Any]:
        """Write the sidecar that makes ``written`` a complete checkpoint, then prune; return the sidecar. Nothing is
        pruned unless the checkpoint and its sidecar are on disk; when the sidecar cannot be written, the checkpoint
        file goes too (it would never load) and the error names the sidecar."""
        sidecar = {
            **meta,
            "file": written.path.name,
            "bytes": written.bytes,
            "sha256": written.sha256,
            "write_seconds": written.write_seconds,
        }
        path = written.path.with_suffix(".json")
        try:
            write_atomic(path, (json.dumps(sidecar, indent=2) + "\n").encode())
        except BaseException:
            path.unlink(missing_ok=True)  # renamed, but its directory failed to sync: not known to be durable
            written.path.unlink(missing_ok=True)
            raise
        stat = written.path.stat()
        self.hashed[written.path.name] = ((stat.st_size, stat.st_mtime_ns, written.sha256), True)  # hashed as written
        self.prune()
        return sidecar

    def complete(self) -> list[dict[str, Any]]:
        """Sidecars whose checkpoint file is there with the recorded size, oldest first."""
        found = []
        for path in self.directory.glob("step_*.json"):
            try:
                sidecar = json.loads(path.read_text())
                checkpoint = self.directory / sidecar["file"]
                if checkpoint.stat().st_size == sidecar["bytes"]:
                    found.append(sidecar)
                else:
                    log.warning(
                        "ignoring %s: its file has %d bytes, not %d", path, checkpoint.stat().st_size, sidecar["bytes"]
                    )
            except (OSError, ValueError, KeyError) as err:
                log.warning("ignoring checkpoint sidecar %s: %s", path, err)
        return sorted(found, key=lambda sidecar: sidecar["swarm_epoch"])

    def newest(self) -> dict[str, Any] | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def intact(self, sidecar: dict[str, Any]) -> bool:
        """Whether the checkpoint file's bytes match the sidecar's sha256; each version of a file is hashed once."""
        path = self.directory / sidecar["file"]
        try:
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns, str(sidecar.get("sha256")))
            known = self.hashed.get(path.name)
            if known is None or known[0] != key:
                digest = hashlib.sha256()
                with path.open("rb") as source:
                    while block := source.read(CHUNK):
                        digest.update(block)
                known = self.hashed[path.name] = (key, digest.hexdigest() == sidecar.get("sha256"))
                if not known[1]:
                    log.warning("%s does not match its sidecar's sha256 (damaged): never loaded, never the best", path)
        except OSError as err:
            log.warning("cannot check %s against its sidecar: %s", path, err)
            return False
        return known[1]

    def best(self) -> dict[str, Any] | None:
        """The evaluated checkpoint with the highest validation accuracy (the newer one on ties) whose bytes match
        its sha256: a checkpoint without a finite accuracy, or a damaged one, is never the best."""
        scored = [sidecar for sidecar in self.complete() if _evaluated(sidecar)]
        scored.sort(key=lambda sidecar: (sidecar["val_accuracy"], sidecar["swarm_epoch"]), reverse=True)
        return next((sidecar for sidecar in scored if self.intact(sidecar)), None)

    def load(self, sidecar: dict[str, Any]) -> dict[str, Any] | None:
        """The state ``sidecar`` commits, or None when its file's bytes do not match their sha256."""
        path = self.directory / sidecar["file"]
        stat, data = path.stat(), path.read_bytes()
        matches = hashlib.sha256(data).hexdigest() == sidecar.get("sha256")
        self.hashed[path.name] = ((stat.st_size, stat.st_mtime_ns, str(sidecar.get("sha256"))), matches)
        if not matches:
            log.warning("skipping %s: its sha256 does not match the sidecar (damaged file)", sidecar["file"])
            return None
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # never unpickle code

    def load_newest(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(sidecar, state) of the newest checkpoint whose bytes match their sha256; None when there is none."""
        for sidecar in reversed(self.complete()):
            state = self.load(sidecar)
            if state is not None:
                return sidecar, state
        return None

    def prune(self) -> None:
        complete = self.complete()
        best = self.best()
        keep = {sidecar["file"] for sidecar in complete[-self.keep_last :]}
        if best is not None:
            keep.add(best["file"])
        pruned = [self.directory / sidecar["file"] for sidecar in complete if sidecar["file"] not in keep]
        for path in pruned:
            path.with_suffix(".json").unlink()  # uncommit first...
        if pruned:
            _fsync_dir(self.directory)  # ...on disk too, before the file goes
        for path in pruned:
            path.unlink()


def _evaluated(sidecar: dict[str, Any]) -> bool:
    accuracy = sidecar.get("val_accuracy")
    return isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and math.isfinite(accuracy)


def export_for_timm(net: nn.Module, model_args: dict[str, Any], results: dict[str, Any], directory: Path) -> None:
    """Write ``net`` the way the Hugging Face Trainer leaves a run: ``model.safetensors``, ``config.json`` (loadable
    with ``timm.create_model("local-dir:<directory>", pretrained=True)``; without ``pretrained=True`` timm builds the
    architecture with fresh weights) and ``all_results.json``, replacing what ``directory`` held.

    Each file is written in ``<directory>.tmp``, synced, renamed into ``directory`` (so a file there is always whole)
    and the directory synced. ``all_results.json`` is removed first and written last, so ``directory`` without it is an
    export a crash or an error cut off (``exported`` says None). An error names ``directory`` and leaves no ``.tmp``."""
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        timm.models.save_for_hf(net, str(staging), model_args=model_args, safe_serialization=True)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / RESULTS).unlink(missing_ok=True)  # uncommit the previous export...
        _fsync_dir(directory)  # ...on disk, before any of its files is replaced
        for staged in sorted(staging.iterdir()):
            with staged.open("rb") as source:
                os.fsync(source.fileno())
            os.replace(staged, directory / staged.name)
        _fsync_dir(directory)
        write_atomic(directory / RESULTS, (json.dumps(results, indent=2) + "\n").encode())
    except Exception as err:
        cause = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
        message = f"exporting the best model into {directory} failed ({cause})"
        raise (OSError(err.errno, message) if isinstance(err, OSError) else RuntimeError(message)) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def exported(directory: Path) -> dict[str, Any] | None:
    """``all_results.json`` of the finished export in ``directory``; None when there is none (or it was cut off)."""
    try:
        results = json.loads((directory / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def withdraw_export(directory: Path) -> None:
    """Remove the export in ``directory`` (``all_results.json`` first, synced): nothing there is served any more."""
    shutil.rmtree(directory.with_name(directory.name + ".tmp"), ignore_errors=True)
    if directory.exists():
        (directory / RESULTS).unlink(missing_ok=True)
        _fsync_dir(directory)
        shutil.rmtree(directory)
