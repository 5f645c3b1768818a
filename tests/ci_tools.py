"""In CI, a test that needs a system tool fails where it would skip: a green CI has run every such test.

Some tests need tools from outside the virtual environment, which ``make test`` installs with apt-get as root
(``TEST_TOOLS`` in the Makefile): podman and its helpers for the image tests, network namespaces (root, ``ip``,
nftables or iptables) for the NAT tests, chromium for the live page. Where a tool is missing they skip, with a reason
that names it, so a person running ``make test`` without root still gets a result. In CI (``CI=true``, set by the CI
runner) such a skip would hide a test that never ran behind a green check: ``pytest_runtest_makereport`` turns it
into a failure that keeps the skip's reason. ``tests/conftest.py`` registers the hook; the markers are registered in
``pyproject.toml``.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

NEED_TOOLS = ("image", "netns", "browser")
"""The markers of tests that need a system tool (``image``: podman; ``netns``: network namespaces; ``browser``:
chromium). Every test with one of them runs in CI."""


def in_ci() -> bool:
    """Whether this session runs in CI: the runner sets ``CI=true`` (as GitHub Actions and GitLab do)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    needs = [name for name in NEED_TOOLS if item.get_closest_marker(name)]
    if needs and report.skipped and not hasattr(report, "wasxfail") and in_ci():
        # a skip's longrepr is (file, line, "Skipped: <reason>"), in whichever phase it skipped
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in CI (CI={os.environ['CI']}), where a test marked {' and '.join(needs)} must run: "
            f"{reason.removeprefix('Skipped: ')}"
        )
    return report
