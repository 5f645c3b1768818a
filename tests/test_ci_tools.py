"""``ci_tools``: in CI, a test that needs a system tool fails where it would skip; elsewhere it skips, saying why.

Each test runs a small pytest session of its own (pytester) with the hook, as ``tests/conftest.py`` registers it."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SESSION = """
import pytest

@pytest.mark.browser
def test_page():  # skips in the test's body, as the page test does
    pytest.skip("chromium not found: apt-get install chromium")

@pytest.mark.netns
@pytest.mark.skipif(True, reason="network namespaces need root")
def test_nat():  # skips at collection's mark, as the NAT tests do
    pass

@pytest.fixture(scope="module")
def podman():  # skips in a fixture, as the image tests do
    pytest.skip("needs iptables: `make test` installs them with apt-get as root")

@pytest.mark.image
def test_image(podman):
    pass

def test_on_a_gpu():  # no tool of ours: a skip CI lets be
    pytest.skip("needs a CUDA GPU")
"""


@pytest.fixture
def session(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest("from ci_tools import pytest_runtest_makereport  # noqa: F401")
    pytester.makeini("[pytest]\nmarkers =\n    image\n    netns\n    browser\n")
    pytester.makepyfile(SESSION)
    return pytester


def test_in_ci_a_test_that_needs_a_missing_tool_fails_naming_the_tool(
    session: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CI", "true")
    result = session.runpytest("-p", "no:cacheprovider", "-rA")
    # the page test fails; the NAT and image tests, skipped before their body, fail in their setup
    result.assert_outcomes(failed=1, errors=2, skipped=1)
    output = result.stdout.str()
    for marker, reason in [
        ("browser", "chromium not found"),
        ("netns", "network namespaces need root"),
        ("image", "needs iptables"),
    ]:
        assert f"skipped in CI (CI=true), where a test marked {marker} must run: {reason}" in output
    assert "needs a CUDA GPU" in output


def test_outside_ci_it_skips_with_its_reason(session: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CI", raising=False)  # a person's `make test`, even when this suite itself runs in CI
    result = session.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(skipped=4)
    output = result.stdout.str()
    for reason in ("chromium not found", "network namespaces need root", "needs iptables", "needs a CUDA GPU"):
        assert reason in output
    assert "must run" not in output
