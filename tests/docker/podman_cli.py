"""Podman for the image tests: the stand-in for the PyTorch base image, the pip settings a build needs here, and a
session that removes every container, network, volume and image it created.

- ``unavailable``: why podman cannot run here (not root, the tools missing, no namespaces), or None.
- ``base_image``: ``localhost/vitpeer-test-base:torch-X-torchvision-Y`` (the pins in constraints.txt), built once per
  machine from ``debootstrap`` and ``base/Containerfile`` and kept for later runs.
- ``pip_mounts``: this machine's pip index settings as a ``/etc/pip.conf`` and the local folders they name, as
  ``podman build --volume`` options, so pip inside a build finds what pip here finds.
- ``Podman``: runs ``podman`` with ``containers.conf`` beside this file; ``remove_all`` removes what it created.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENV = {**os.environ, "CONTAINERS_CONF": str(HERE / "containers.conf")}
TOOLS = ("podman", "runc", "debootstrap", "iptables")  # iptables: netavark runs it for container networks
SUITE = "bookworm"  # Python 3.11, as the torch wheels here are built for
MEASURED: dict[str, str] = {}  # what the image tests measured, printed after the session by conftest.py


def podman(*args: str, timeout: float = 120, check: bool = True, stdin=None) -> subprocess.CompletedProcess:
    """``podman args...`` with our containers.conf; past ``timeout`` it gets SIGTERM first, so that a build removes
    its working containers (a SIGKILLed one leaves them behind), then SIGKILL."""
    process = subprocess.Popen(
        ["podman", *args], env=ENV, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        raise AssertionError(f"podman {' '.join(args)} took over {timeout:.0f} s") from None
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def unavailable() -> str | None:
    """Why the image tests cannot run on this machine, in one line; None when they can."""
    if os.geteuid() != 0:
        return "the image tests run podman as root (rootful networks and volumes); run them as root"
    missing = [tool for tool in TOOLS if not shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")]
    if missing:
        return f"needs {', '.join(missing)}: `make test` installs them with apt-get as root"
    probe = subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no namespaces for containers here: unshare says {probe.stderr.strip()}"
    return None


def pinned(name: str) -> str:
    """The version constraints.txt pins ``name`` to (the torch and torchvision CI tests with)."""
    found = re.search(rf"^{name}==(\S+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert found, f"constraints.txt pins no {name}"
    return found.group(1)


def _host_pip_settings() -> dict[str, str]:
    """The index settings pip uses here, from ``pip config list``: the environment's over the files' (pip's order),
    an ``install`` section's over ``global``."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    wanted = ("index-url", "extra-index-url", "find-links", "no-index", "trusted-host", "cert")
    rank = {":env:": 0, "install": 1, "global": 2}
    found: dict[str, tuple[int, str]] = {}
    for line in listed.splitlines():
        section, _, rest = line.partition(".")
        key, _, value = rest.partition("=")
        if key in wanted and section in rank and (key not in found or rank[section] < found[key][0]):
            found[key] = (rank[section], value.strip().strip("'\""))
    return {key: value for key, (_, value) in found.items()}


def _local_folder(location: str, index: bool) -> Path | None:
    """The folder on this disk a pip location needs: a find-links folder itself, or a file:// index's parent (a
    ``simple/`` index links to its files beside it, ``../../files/...``); None for a remote location."""
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path(parsed.path)
    return path.parent if index else path


def pip_mounts(workdir: Path) -> list[str]:
    """``--volume`` options that give pip inside a build this machine's pip settings: /etc/pip.conf, the local
    folders it names and its CA bundle, each at the same path as here (read-only; a build leaves no layer of them).
    Remote indexes are reached through the container's network, as pip here reaches them."""
    settings = _host_pip_settings()
    folders: set[Path] = set()
    for key in ("index-url", "extra-index-url", "find-links"):
        for location in settings.get(key, "").split():
            folder = _local_folder(location, index=key != "find-links")
            if folder is not None and folder.is_dir():
                folders.add(folder)
    config = workdir / "pip.conf"
    config.write_text("[global]\n" + "".join(f"{key} = {value}\n" for key, value in sorted(settings.items())))
    mounts = ["--volume", f"{config}:/etc/pip.conf:ro"]
    for path in sorted(folders) + ([Path(settings["cert"])] if "cert" in settings else []):
        mounts += ["--volume", f"{path}:{path}:ro"]
    return mounts


def debian_mirror() -> str | None:
    """The Debian mirror apt already uses here (a deb822 ``URIs:`` or a one-line ``deb URI`` source, not the security
    archive); None leaves debootstrap its default."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        text = source.read_text() if source.is_file() else ""
        for uri in re.findall(r"^\s*(?:URIs:|deb)\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.MULTILINE):
            if "security" not in uri:
                return uri
    return None


def base_image() -> tuple[str, float | None]:
    """The stand-in for pytorch/pytorch with the pinned torch and torchvision, and the seconds it took to build here
    (None: it was already there). Built under a lock, so that two test sessions build it once."""
    torch, torchvision = pinned("torch"), pinned("torchvision")
    tag = f"localhost/vitpeer-test-base:torch-{torch}-torchvision-{torchvision}"
    with open(Path(tempfile.gettempdir()) / "vitpeer-test-base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if podman("image", "exists", tag, check=False).returncode == 0:
            return tag, None
        started = time.monotonic()
        rootfs_tag = f"localhost/vitpeer-test-rootfs:{uuid.uuid4().hex[:8]}"
        workdir = Path(tempfile.mkdtemp(prefix="vitpeer-base-"))
        try:
            rootfs = workdir / "rootfs"
            mirror = debian_mirror()
            command = ["debootstrap", "--variant=minbase", "--include=python3,python3-venv", SUITE, str(rootfs)]
            command += [mirror] if mirror else []
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"debootstrap exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr}"
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            podman("import", "-", rootfs_tag, stdin=tar.stdout, timeout=600)
            tar.stdout.close()
            assert tar.wait(timeout=60) == 0
            build = ["build", "--layers=false", "--tag", tag, "--build-arg", f"ROOTFS={rootfs_tag}"]
            build += ["--build-arg", f"TORCH={torch}", "--build-arg", f"TORCHVISION={torchvision}"]
            podman(*build, *pip_mounts(workdir), str(HERE / "base"), timeout=1800)
        finally:
            podman("rmi", "--force", rootfs_tag, check=False)
            shutil.rmtree(workdir, ignore_errors=True)
        return tag, time.monotonic() - started


class Podman:
    """``podman`` for one test session: every container, network, volume and image it creates is named with its own
    prefix and removed by ``remove_all`` (the base image is not one of them: it is kept for the next session)."""

    def __init__(self) -> None:
        self.prefix = f"vitpeer-test-{uuid.uuid4().hex[:8]}"
        self.created: list[tuple[str, str]] = []  # (kind, name), in the order they were made

    def name(self, what: str) -> str:
        return f"{self.prefix}-{what}"

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return podman(*args, timeout=timeout, check=check)

    def created_as(self, kind: str, name: str) -> str:
        """Remember that ``name`` (a container, network, volume or image) is this session's to remove."""
        self.created.append((kind, name))
        return name

    def network(self, what: str) -> str:
        name = self.created_as("network", self.name(what))
        self("network", "create", name)
        return name

    def volume(self, what: str) -> str:
        name = self.created_as("volume", self.name(what))
        self("volume", "create", name)
        return name

    def start(self, what: str, image: str, *args: str, options: tuple[str, ...] = ()) -> str:
        """``podman run -d --name PREFIX-what [options] image args...``: the container's name."""
        name = self.created_as("container", self.name(what))
        self("run", "--detach", "--name", name, *options, image, *args)
        return name

    def logs(self, container: str) -> str:
        done = self("logs", container, check=False)
        return done.stdout + done.stderr

    def remove_all(self) -> None:
        """Containers first (they hold networks, volumes and images), then the rest; whatever failed before."""
        order = {"container": 0, "network": 1, "volume": 1, "image": 2}
        remove = {
            "container": ("rm", "--force", "--time", "0"),
            "network": ("network", "rm", "--force"),
            "volume": ("volume", "rm", "--force"),
            "image": ("rmi", "--force"),
        }
        for kind, name in sorted(reversed(self.created), key=lambda item: order[item[0]]):
            self(*remove[kind], name, check=False, timeout=120)
        self.created.clear()
