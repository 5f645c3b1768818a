"""Shared fixtures: every process a test starts is reaped, even when the test fails; GPU tests skip without one;
in CI, tests that need a system tool fail where they would skip (``ci_tools``); one torch thread per process."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

import pytest
import torch
from ci_tools import pytest_runtest_makereport  # noqa: F401 (a hook: pytest finds it by its name here)

from vitpeer.peer.core.runtime.processes import descendants

# One torch thread per process, in this one (in-process peers and fits), the hivemind processes it forks, and every
# process a test starts (they inherit the environment): the swarm tests run several torch processes at once, and with
# torch's default of one thread per core each, two of them on 2 cores ran 8x slower. Measured here: the in-process
# peer of test_strategy.py took 8.9-11.1 s with the default, 5.1-5.3 s with one thread.
THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
torch.set_num_threads(THREADS)

KEEP = {"torch_shm_manag"}  # torch's shared-memory helper: it leaves with us, and killing it first aborts the exit


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (p2p daemons, peer processes) but torch's own helper, read from /proc."""
    return [child for child, name in descendants(pid) if name not in KEEP]


@pytest.fixture(scope="session", autouse=True)
def reap_children():
    """After the session, kill whatever the tests left running under this process (as hivemind's tests do).

    Not after each test: torch's shared-memory helpers live across tests, and tests that start peers stop them
    themselves in ``finally`` blocks."""
    yield
    for pid in _children(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


EXIT_GRACE = 60  # seconds the interpreter may take to exit once pytest is done
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Once pytest is done, the interpreter has ``EXIT_GRACE`` seconds to exit, else it exits with pytest's status.

    In-process hivemind objects a failed test could not shut down leave threads behind, and Python's exit joins them
    (``concurrent.futures`` joins every executor thread): one blocked on a lock held CI past its limit after all tests
    had run. The stacks of what still runs are printed, so the leak can be found."""
    status = config.stash.get(_EXIT_STATUS, 1)

    def exit_anyway():
        time.sleep(EXIT_GRACE)
        print(f"\nthe test process did not exit {EXIT_GRACE} s after pytest finished; its threads:", file=sys.stderr)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(status)

    threading.Thread(target=exit_anyway, name="exit-watchdog", daemon=True).start()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
