"""Every bad input gives one clear line naming the problem, exit code 2 when the user's input is wrong and 1 when the
world fails (peers, coordinator), and leaves an existing run directory as it was. README's "When things go wrong"
table lists these rows; ``test_readme_table_names_tests_that_exist`` keeps it true.

A refusal comes before torch, timm or Lightning is imported (``test_a_refusal_imports_no_torch_timm_or_lightning``),
which is what keeps it fast; the model name is checked without timm (``test_the_model_check_agrees_with_timm``)."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from processes import free_port

from vitpeer.peer.cli import main
from vitpeer.peer.core.config import ConfigError, load_config, preflight
from vitpeer.peer.core.runtime.processes import stop_all

VITPEER = Path(sys.executable).with_name("vitpeer")  # the virtual env's console script
README = Path(__file__).resolve().parents[2] / "README.md"
TESTS = Path(__file__).resolve().parents[1]
PEER_ID = "12D3KooWMDNVJKmcbMXyCtbGCidASwAV1xnjExXHgsbYsDdHkANH"  # a valid peer id nobody runs


@dataclass(frozen=True)
class Row:
    command: str  # formatted with {run} {tmp} {closed} {held} {peer}, then split on spaces
    exit: int  # 2: the user's input is wrong; 1: the world failed
    says: str  # what the first stderr line must contain (formatted like command)
    process: bool = False  # a real ``vitpeer`` process (the network rows), else click's runner in this process


OUT = "--output-dir {run}"
ROWS: dict[str, Row] = {
    "malformed-multiaddr": Row(
        "join --initial-peers /ip4/127.0.0.1/tcp/notaport/p2p/{peer} " + OUT, 2, "swarm.initial_peers"
    ),
    "garbage-peer-id": Row(
        "join --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/Qm0OIl " + OUT, 2, "not a peer multiaddr"
    ),
    "unreachable-initial-peers": Row(
        "join --initial-peers /ip4/127.0.0.1/tcp/{closed}/p2p/{peer} --max-steps 1 " + OUT,
        1,
        "none of the initial peers answered (/ip4/127.0.0.1/tcp/{closed}/p2p/{peer})",
        process=True,
    ),
    "port-in-use": Row("join --host-port {held} " + OUT, 2, "swarm.host_port = {held} is already in use", process=True),
    "coordinator-port-in-use": Row(
        "coordinator --host-port {held} --http-port 0 --state-dir {run}", 2, "host_port = {held} is already in use"
    ),
    "unknown-model": Row("join --model vit_tinny_patch16_224 " + OUT, 2, "model.name = 'vit_tinny_patch16_224'"),
    "unknown-dataset": Row("join --config {tmp}/mnist.yaml " + OUT, 2, "data.source = 'mnist'"),
    "missing-data-dir": Row(
        "join --config cifar10_vit_b32_hivemind --data-dir {tmp}/no-such-dir " + OUT, 2, "data.data_dir = '{tmp}"
    ),
    "invalid-yaml": Row("join --config {tmp}/broken.yaml " + OUT, 2, "broken.yaml, line 3, column 1: not valid YAML"),
    "unknown-key": Row("train --config {tmp}/typo.yaml " + OUT, 2, "data.batch_sise: unknown key; did you mean"),
    "wrong-type-yaml": Row("join --config {tmp}/many.yaml " + OUT, 2, "data.batch_size = 'many'"),
    "wrong-type-flag": Row("join --batch-size many " + OUT, 2, "Invalid value for '--batch-size'"),
    "zero-batch": Row("join --batch-size 0 " + OUT, 2, "data.batch_size = 0: Input should be greater than 0"),
    "negative-batch": Row("train --batch-size -8 " + OUT, 2, "data.batch_size = -8: Input should be greater than 0"),
    "target-below-batch": Row(
        "join --batch-size 32 --target-batch-size 16 " + OUT, 2, "swarm.target_batch_size = 16 is below"
    ),
    "unwritable-output-dir": Row(
        "join --output-dir {tmp}/a_file/sub", 2, "trainer.output_dir = '{tmp}/a_file/sub' cannot be written"
    ),
    "corrupt-checkpoint-resume": Row(
        "join --resume {run}/checkpoints/broken.ckpt " + OUT, 2, "trainer.resume = '{run}/checkpoints/broken.ckpt'"
    ),
    "corrupt-checkpoint-evaluate": Row(
        "evaluate {run}/checkpoints/broken.ckpt", 2, "CHECKPOINT = '{run}/checkpoints/broken.ckpt' is not a readable"
    ),
    "coordinator-down": Row(
        "join --coordinator http://127.0.0.1:{closed} --coordinator-timeout 2 " + OUT,
        1,
        "coordinator http://127.0.0.1:{closed} did not answer for 2 s",
        process=True,
    ),
    "coordinator-down-monitor": Row(
        "monitor --coordinator http://127.0.0.1:{closed} --coordinator-timeout 1",
        1,
        "coordinator http://127.0.0.1:{closed} did not answer for 1 s",
    ),
}


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on (127.0.0.1; vitpeer wants it on every interface)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def earlier_run(run: Path) -> dict[str, bytes]:
    """An earlier run's directory: a checkpoint, a truncated one, its config. Returns its files' bytes."""
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"net.weight": torch.arange(6.0)}, "global_step": 7}, run / "checkpoints" / "last.ckpt")
    whole = (run / "checkpoints" / "last.ckpt").read_bytes()
    (run / "checkpoints" / "broken.ckpt").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    (run / "config.yaml").write_text(load_config("digits_tiny", {"trainer.max_steps": 7}).to_yaml())
    return files(run)


def files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run_vitpeer(args: list[str], timeout: float) -> tuple[int, str, str]:
    """The real console script; stopped (with the DHT it started) even when the test fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [str(VITPEER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        stop_all([process])
    return process.returncode, stdout, stderr


def bad_input_scene(tmp_path: Path, held_port: int) -> dict[str, Any]:
    """The files and ports the rows point at, with an earlier run in ``{run}``; what fills the rows' blanks."""
    earlier_run(tmp_path / "run")
    (tmp_path / "a_file").write_text("a file where a folder would go\n")
    (tmp_path / "mnist.yaml").write_text("data:\n  source: mnist\n")
    (tmp_path / "broken.yaml").write_text("data:\n  batch_size: [32\n")  # the list is never closed
    (tmp_path / "typo.yaml").write_text("data:\n  batch_sise: 32\n")
    (tmp_path / "many.yaml").write_text("data:\n  batch_size: many\n")
    return {"run": tmp_path / "run", "tmp": tmp_path, "closed": free_port(), "held": held_port, "peer": PEER_ID}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("row", list(ROWS.values()), ids=list(ROWS))
def test_bad_input(row: Row, tmp_path: Path, held_port: int):
    where = bad_input_scene(tmp_path, held_port)
    run = where["run"]
    before = files(run)
    args = row.command.format(**where).split()

    started = time.monotonic()
    if row.process:
        code, stdout, stderr = run_vitpeer(args, timeout=120)
    else:
        result = CliRunner().invoke(main, args)
        code, stdout, stderr = result.exit_code, result.stdout, result.stderr
    seconds = time.monotonic() - started

    lines = stderr.strip().splitlines()
    assert code == row.exit, stdout + stderr
    assert lines and lines[0].startswith("Error: ") and row.says.format(**where) in lines[0], stderr
    assert len(lines) == 1 and len(stdout.splitlines()) <= 2 and "Traceback" not in stdout + stderr, stdout + stderr
    assert seconds < 90, f"took {seconds:.0f} s"  # a bounded wait, startup included
    after = files(run)
    assert {name: after.get(name) for name in before} == before  # nothing saved is lost or changed
    if row.exit == 2:
        assert after == before  # refused before anything was written


HEAVY = ("torch", "timm", "pytorch_lightning", "lightning_fabric", "hivemind")
PROBE = f"""
import atexit, sys
from vitpeer.peer.cli import main
atexit.register(lambda: print("heavy imports:", *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr))
main(sys.argv[1:], prog_name="vitpeer")
"""
REFUSED = {name: row for name, row in ROWS.items() if row.exit == 2}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("row", list(REFUSED.values()), ids=list(REFUSED))
def test_a_refusal_imports_no_torch_timm_or_lightning(row: Row, tmp_path: Path, held_port: int):
    """In a fresh interpreter, as a user runs it: the refusal is printed before any heavy library is imported."""
    where = bad_input_scene(tmp_path, held_port)
    args = row.command.format(**where).split()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=50)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and row.says.format(**where) in lines[0], done.stderr
    assert lines[-1] == "heavy imports:", done.stderr


def test_the_model_check_agrees_with_timm():
    """``preflight.check_model`` reads timm's registry from its files; it must say what ``timm.is_model`` says, for
    every architecture, deprecated name and pretrained tag the installed timm lists, and for near misses."""
    import timm

    models, deprecated = preflight.timm_models()
    assert models == set(timm.list_models())
    assert deprecated == set(timm.models.get_deprecated_models())
    tagged = timm.list_models(include_tags=True)
    assert "vit_base_patch16_224.augreg_in21k" in tagged
    for name in [*tagged, *deprecated]:
        preflight.check_model(name)  # accepted, as timm.is_model accepts it
    near_misses = [name[:-1] + "x" for name in timm.list_models()[::20]] + ["vit_tinny_patch16_224", "vit", ""]
    for name in near_misses:
        try:
            preflight.check_model(name)
            accepted = True
        except ConfigError as err:
            accepted = False
            assert str(err).startswith(f"model.name = {name!r} is not a timm model; ")
        assert accepted == timm.is_model(name), name


# --- the README's table ----------------------------------------------------------------------------------------------

CELL_TEST = re.compile(r"`([\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`")


def readme_rows() -> list[list[str]]:
    """The cells of the tables under "## When things go wrong" and "## Hostile peers" (headers and separators left
    out)."""
    text, rows = README.read_text(), []
    for heading in ("## When things go wrong", "## Hostile peers"):
        section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
        table = [line for line in section.splitlines() if line.startswith("|")]
        rows += [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    return rows


def parametrize_ids(function) -> list[str] | None:
    """The ids pytest gives a parametrized test: explicit ids, pytest.param ids, or plain values joined by '-'."""
    marks = [mark for mark in getattr(function, "pytestmark", []) if mark.name == "parametrize"]
    if not marks:
        return None
    ids: list[str] = []
    for mark in marks[:1]:
        given = mark.kwargs.get("ids", mark.args[2] if len(mark.args) > 2 else None)
        values = mark.kwargs.get("argvalues", mark.args[1] if len(mark.args) > 1 else [])
        if isinstance(given, list | tuple):
            return [str(value) for value in given]
        for value in values:
            if hasattr(value, "id") and getattr(value, "id", None):
                ids.append(value.id)
            else:
                parts = value.values if hasattr(value, "values") else value
                parts = parts if isinstance(parts, tuple) else (parts,)
                ids.append("-".join(str(part) for part in parts))
    return ids


@functools.cache
def load_test_file(file: str) -> ModuleType | None:
    """The test file ``file`` (a name under tests/, or a path from tests/), imported; None when there is none."""
    found = sorted(TESTS.rglob(file)) if "/" not in file else [TESTS / file]
    if not found or not found[0].is_file():
        return None
    name = f"readme_check_{found[0].stem}"
    spec = importlib.util.spec_from_file_location(name, found[0])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(found[0].parent))  # as pytest's rootdir-relative import does: its sibling modules
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(found[0].parent))
    return module


def named_test(file: str, function: str, test_id: str | None) -> str | None:
    """Why ``file::function[test_id]`` names no test, or None when it does."""
    module = load_test_file(file)
    if module is None:
        return f"no test file {file} under tests/"
    test = getattr(module, function, None)
    if not callable(test):
        return f"{file} has no {function}"
    if test_id is not None and test_id not in (parametrize_ids(test) or []):
        return f"{file}::{function} has no case {test_id!r}"
    return None


def test_readme_table_names_tests_that_exist():
    rows = readme_rows()
    # | Fault or bad input | What vitpeer does | Exit | Time | Test |
    assert rows and all(len(row) == 5 for row in rows), rows
    problems, ours, times = [], {}, {}
    for fault, _, exit_code, seconds, cell in rows:
        named = CELL_TEST.findall(cell)
        if not named:
            problems.append(f"{fault}: its Test cell names no test")
        for file, function, test_id in named:
            problem = named_test(file, function, test_id or None)
            if problem:
                problems.append(f"{fault}: {problem}")
            if file == Path(__file__).name and function == "test_bad_input":
                ours[test_id], times[test_id] = exit_code, seconds
    assert not problems, problems
    untimed = [test_id for test_id, seconds in times.items() if not re.fullmatch(r"[\d.]+ s\b.*", seconds)]
    assert not untimed, f"rows whose Time cell gives no seconds: {untimed}"
    assert set(ours) == set(ROWS), "every row of ROWS is in the README table, and no other"
    assert {test_id: int(re.sub(r"\D", "", code)) for test_id, code in ours.items()} == {
        key: row.exit for key, row in ROWS.items()
    }
