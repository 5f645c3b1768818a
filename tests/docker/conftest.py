"""The image tests' measurements (base image, build time, size, stop time), printed after the session."""

from __future__ import annotations

from podman_cli import MEASURED


def pytest_terminal_summary(terminalreporter) -> None:
    if MEASURED:
        terminalreporter.section("volunteer image (podman)")
        for what, value in MEASURED.items():
            terminalreporter.write_line(f"{what}: {value}")
