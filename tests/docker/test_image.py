"""The Docker image without a Docker engine: hadolint on the Dockerfile, and the image's own entrypoint, default
command and healthcheck, read from the Dockerfile and run here the way the container would run them."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from processes import METRICS_AT, free_port, printed, spawn, wait_for

from vitpeer.peer.core.runtime.processes import stop_all

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's console scripts: vitpeer, hadolint


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions split into its build stages, each starting with its FROM."""
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument list; shell form would need a shell in the image."""
    assert arguments.startswith("["), f"not exec form: {arguments}"
    return json.loads(arguments)


def the(keyword: str) -> str:
    values = [rest for name, rest in instructions() if name == keyword]
    assert values, f"the Dockerfile has no {keyword}"
    return values[-1]


def image_env(tmp_path: Path) -> dict[str, str]:
    """The Dockerfile's ENV, with its /data volume here in tmp_path."""
    env = dict(os.environ)
    for name, rest in instructions():
        if name == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = value.replace("/data", str(tmp_path / "data"))
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_hadolint_passes():
    done = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_runs_as_a_non_root_user_with_its_state_in_the_data_volume():
    user = the("USER").split(":")[0]
    assert user not in ("root", "0"), user
    assert the("VOLUME") == "/data" and the("WORKDIR") == "/data"
    assert {"31337", "9470"} <= set(the("EXPOSE").split())
    assert (ROOT / ".dockerignore").is_file() and ".venv" in (ROOT / ".dockerignore").read_text().split()


def test_the_image_installs_the_built_wheel_with_the_base_images_torch():
    *builders, final = stages()
    wheel_builds = [rest for stage in builders for name, rest in stage if name == "RUN" and "pip wheel" in rest]
    assert len(wheel_builds) == 1 and "--no-deps" in wheel_builds[0], wheel_builds
    assert not [rest for name, rest in final if name in ("COPY", "ADD")], "no source tree in the volunteers' image"
    (install,) = [rest for name, rest in final if name == "RUN" and "pip install" in rest]
    assert "--editable" not in install and " -e " not in install
    assert re.search(r"pip install .*/vitpeer-\*\.whl", install), install
    assert "--constraint /tmp/preinstalled.txt" in install

    # the constraint pins exactly the torch and torchvision already installed: run its snippet with this Python
    snippet = re.search(r'python -c ("(?:[^"\\]|\\.)*") *> */tmp/preinstalled.txt', install)
    assert snippet, install
    code = shlex.split(snippet.group(1))[0]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"{name}=={version(name)}" for name in ("torch", "torchvision")]


def test_the_wheel_stage_copies_files_that_exist_and_reach_the_build_context():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    copied = []
    for name, rest in instructions():
        if name == "COPY" and not rest.startswith("--from"):
            *sources, _target = rest.split()
            copied += sources
    assert {"pyproject.toml", "README.md", "configs", "peer", "coordinator", "monitor"} <= set(copied), copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source not in ignored, f"{source} is in .dockerignore"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_entrypoint_command_and_healthcheck_work_as_in_the_container(tmp_path: Path):
    entrypoint, command = exec_form(the("ENTRYPOINT")), exec_form(the("CMD"))
    assert entrypoint == ["vitpeer"]
    env = image_env(tmp_path)
    (tmp_path / "data").mkdir()
    done = subprocess.run([str(BIN / entrypoint[0]), *command], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and "--initial-peers" in done.stdout, done.stderr  # `docker run vitpeer`: join's help

    healthcheck = exec_form(the("HEALTHCHECK").split(" CMD ", 1)[1])
    assert healthcheck[0] == "python"  # the image's python, the one vitpeer is installed into
    probe = [sys.executable, *healthcheck[1:]]
    port = free_port()
    env["VITPEER_METRICS_PORT"] = str(port)
    assert subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode != 0  # nothing serves yet

    # the README's volunteer line, as the container runs it: a peer with its metrics on 0.0.0.0
    out = tmp_path / "data" / "peer"
    out.mkdir(parents=True)
    args = ["join", "--output-dir", str(out), "--host-maddr", "/ip4/127.0.0.1/tcp/0", "--max-steps", "10000"]
    peer = spawn([*args, "--metrics-addr", "0.0.0.0", "--metrics-port", str(port)], out / "log.txt", **env)
    try:
        wait_for("the peer's metrics endpoint", lambda: printed(out / "log.txt", METRICS_AT), 120)
        done = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    finally:
        stop_all([peer])
    assert (out / "identity.key").is_file()  # the peer's identity lives in the volume
