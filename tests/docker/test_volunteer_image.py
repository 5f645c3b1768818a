"""The volunteer image built and run for real, with podman: the Dockerfile as it is, on a local stand-in for the
PyTorch base (Debian, Python, the pinned torch and torchvision pip-installed; see base/Containerfile), then what a
volunteer runs: the default command as uid 10001, and a coordinator with two peers on their own network that train,
pass their health checks, stop within podman's 10 s with exit code 0 and come back with the same peer id.

Rootful podman with runc (``containers.conf``); skipped, in one line, where it cannot run (``podman_cli.unavailable``).
The image is built once for the module and removed after it, with every container, network and volume; the base image
is kept for the next run (rebuilt only when constraints.txt pins another torch). Measurements are printed at the end
of the session (``conftest.py``).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from podman_cli import MEASURED, ROOT, Podman, base_image, pinned, pip_mounts, podman, unavailable
from processes import fetch, wait_for

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(2400)]

# every torch and torchvision distribution Python sees, wherever installed: a second torch would be listed twice
TORCHES = (
    "import importlib.metadata as m, json; print(json.dumps(sorted([d.metadata['Name'].lower(), d.version] "
    "for d in m.distributions() if d.metadata['Name'].lower() in ('torch', 'torchvision'))))"
)
PEER_ID = r"others join with: .*?/p2p/(\w+)"
GB = 1e9


@pytest.fixture(scope="module")
def session() -> Iterator[Podman]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    created = Podman()
    try:
        yield created
    finally:
        created.remove_all()


@pytest.fixture(scope="module")
def image(session: Podman) -> SimpleNamespace:
    """The Dockerfile built on the stand-in base (``podman build --format docker``: the OCI format has no
    HEALTHCHECK), pip inside it reaching the indexes pip here reaches."""
    base, base_seconds = base_image()
    MEASURED["base image"] = f"{base}, " + (f"built in {base_seconds:.0f} s" if base_seconds else "cached")
    tag = session.created_as("image", f"localhost/{session.prefix}:latest")
    with tempfile.TemporaryDirectory(prefix="vitpeer-build-") as workdir:
        started = time.monotonic()
        build = ["build", "--format", "docker", "--layers=false", "--build-arg", f"BASE_IMAGE={base}", "--tag", tag]
        session(*build, *pip_mounts(Path(workdir)), str(ROOT), timeout=1500)
        seconds = time.monotonic() - started
    MEASURED["Dockerfile build"] = f"{seconds:.0f} s"
    return SimpleNamespace(tag=tag, base=base, build_seconds=seconds)


def size(image: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)


def python_in(image: str, code: str) -> str:
    return podman("run", "--rm", "--entrypoint", "python", image, "-c", code).stdout


def test_the_image_holds_one_torch_the_base_images_and_no_build_leftovers(image: SimpleNamespace):
    base_torches = json.loads(python_in(image.base, TORCHES))
    assert base_torches == [["torch", pinned("torch")], ["torchvision", pinned("torchvision")]]
    assert json.loads(python_in(image.tag, TORCHES)) == base_torches  # installing vitpeer pulled no second torch
    done = podman("run", "--rm", "--entrypoint", "pip", image.tag, "check", check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    # vitpeer lives in site-packages; the wheel, the sources and the constraint file stayed out of the layers
    leftovers = "[p for p in ('/wheels', '/src', '/tmp/preinstalled.txt') if os.path.exists(p)]"
    where = f"import os, vitpeer.peer; print(vitpeer.peer.__file__, {leftovers})"
    found = python_in(image.tag, where).split(" ", 1)
    assert "/site-packages/vitpeer/peer/" in found[0] and found[1].strip() == "[]", found

    total, base = size(image.tag), size(image.base)
    MEASURED["image size"] = f"{total / GB:.2f} GB ({base / GB:.2f} GB base + {(total - base) / GB:.2f} GB vitpeer)"
    print(f"image {total / GB:.2f} GB, base {base / GB:.2f} GB, built in {image.build_seconds:.0f} s")
    assert 0 < total - base < 1 * GB  # vitpeer and its dependencies; a CUDA torch alone is several GB
    assert image.build_seconds < 1500


def test_the_default_command_prints_joins_help_as_uid_10001(image: SimpleNamespace):
    assert podman("image", "inspect", "--format", "{{.Config.User}}", image.tag).stdout.strip() == "10001:10001"
    done = podman("run", "--rm", image.tag, check=False)
    assert done.returncode == 0 and "--initial-peers" in done.stdout, done.stdout + done.stderr
    assert podman("run", "--rm", "--entrypoint", "id", image.tag).stdout.split()[:2] == [
        "uid=10001(vitpeer)",
        "gid=10001(vitpeer)",
    ]


def test_a_swarm_of_containers_trains_passes_health_checks_stops_and_restarts(image: SimpleNamespace, session: Podman):
    network = session.network("net")
    coordinator = session.start(
        "coordinator",
        image.tag,
        *("coordinator", "--config", "digits_tiny_gradient", "--state-dir", "/data/coordinator"),
        *("--host-port", "31337"),
        *("--http-host", "0.0.0.0", "--http-port", "8470", "--http-name", session.name("coordinator")),
        options=("--network", network, "--volume", f"{session.volume('coordinator')}:/data")
        + ("--env", "VITPEER_METRICS_PORT=8470", "--publish", "127.0.0.1::8470"),  # as in monitor/compose.yaml
    )
    api = "http://" + session("port", coordinator, "8470/tcp").stdout.strip()
    volumes = {index: session.volume(f"peer-{index}") for index in (1, 2)}

    def join(what: str, index: int) -> str:  # the README's volunteer line, through the coordinator by its name
        command = ["join", "--coordinator", f"http://{coordinator}:8470", "--config", "digits_tiny_gradient"]
        command += ["--output-dir", "/data/peer", "--host-port", "31337", "--max-steps", "200"]
        command += ["--metrics-addr", "0.0.0.0", "--metrics-port", "9470"]
        options = ("--network", network, "--volume", f"{volumes[index]}:/data", "--shm-size", "1g")
        return session.start(what, image.tag, *command, options=options)

    def peer_id(container: str) -> str | None:
        found = re.search(PEER_ID, session.logs(container))
        return found.group(1) if found else None

    started = time.monotonic()
    containers = [coordinator]
    try:
        wait_for("the coordinator's /status", lambda: _answers(f"{api}/status"), 120)
        containers += [join("peer-1", 1), join("peer-2", 2)]
        ids = [wait_for(f"{name}'s peer id", lambda name=name: peer_id(name), 120) for name in containers[1:]]

        # 1. both peers train together: the coordinator lists them, a few swarm steps done
        def trained() -> dict | None:
            status = json.loads(fetch(f"{api}/status"))
            listed = {report["peer_id"] for report in status["peers"]}
            return status if set(ids) <= listed and (status["swarm_epoch"] or 0) >= 3 else None

        status = wait_for("both peers in /status after 3 swarm steps", trained, 240, every=1)
        MEASURED["swarm"] = f"2 peers at swarm step {status['swarm_epoch']} {time.monotonic() - started:.0f} s in"

        # 2. the image's HEALTHCHECK passes on the coordinator (its API) and on a peer (its /metrics on 0.0.0.0)
        for container in containers[:2]:
            done = session("healthcheck", "run", container, check=False)
            assert done.returncode == 0 and "unhealthy" not in done.stdout, (container, done.stdout, done.stderr)

        # 3. `podman stop -t 10`: the peer leaves before the SIGKILL, exit code 0, its checkpoint in its volume
        stopping = time.monotonic()
        session("stop", "--time", "10", containers[1], timeout=60)
        stop_seconds = time.monotonic() - stopping
        exit_code = session("inspect", "--format", "{{.State.ExitCode}}", containers[1]).stdout.strip()
        MEASURED["podman stop"] = f"{stop_seconds:.1f} s, exit code {exit_code}"
        assert exit_code == "0" and stop_seconds < 10, (exit_code, stop_seconds)
        data = Path(session("volume", "inspect", "--format", "{{.Mountpoint}}", volumes[1]).stdout.strip())
        checkpoint = torch.load(data / "peer" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["swarm_epoch"] >= 3, checkpoint["swarm_epoch"]
        assert (data / "peer" / "identity.key").stat().st_uid == 10001  # written by the image's user

        # 4. a new container on the same volume is the same peer, and trains on
        containers.append(join("peer-1-again", 1))
        assert wait_for("the restarted peer's id", lambda: peer_id(containers[-1]), 120) == ids[0]
        wait_for("the restarted peer's swarm step", lambda: "swarm step" in session.logs(containers[-1]), 180)
    except AssertionError as failure:
        logs = "".join(f"\n--- {name}:\n{session.logs(name)[-2500:]}" for name in containers)
        raise AssertionError(f"{failure}{logs}") from None


def _answers(url: str) -> bool:
    try:
        return bool(fetch(url))
    except OSError:
        return False
