"""Debian's Prometheus binaries for the monitor tests (``make test`` unpacks them into ``.tools/prometheus``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

UNPACKED = Path(__file__).resolve().parents[2] / ".tools" / "prometheus" / "usr" / "bin"


def _binary(name: str) -> Path:
    found = UNPACKED / name if (UNPACKED / name).is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found in {UNPACKED} or on PATH: run `make test`, which unpacks Debian's prometheus")
    return Path(found)


@pytest.fixture(scope="session")
def promtool() -> Path:
    return _binary("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    return _binary("prometheus")
