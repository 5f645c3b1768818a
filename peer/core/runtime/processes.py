"""Nothing outlives its owner: the helpers every vitpeer process uses to stop what it starts, however it ends.

A peer, the coordinator, ``vitpeer doctor`` and the demo start processes of their own: hivemind's DHT and averager
processes, each DHT with its Go p2p daemon (``p2pd``), or whole ``vitpeer join`` processes. Left running, a DHT keeps
its port and identity (a restart on the same ``--host-port`` fails, the others see a ghost peer).

- ``children_die_with_us``: forked children are SIGKILLed by Linux when this process dies, even on SIGKILL;
- ``stop_all``: SIGTERM our subprocesses, give them a grace period, then SIGKILL and reap them;
- ``descendants`` and ``kill_and_reap``: every process below one (from /proc); SIGKILL one and collect its status;
- ``adopting_orphans``: while a block runs, orphaned descendants become ours; new ``p2pd`` are stopped after it;
- ``in_background``: a call in a daemon thread, awaited with a timeout, that cannot delay this process's exit.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.util
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37


def _die_with_parent(_: object) -> None:
    """In a freshly forked child: ask Linux to SIGKILL it when its parent dies (then its p2p daemon exits too)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):  # not Linux: children may outlive a killed parent there
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(1)


class _Lifetime:
    """Anchor for the after-fork hook (multiprocessing keeps registered objects by weak reference)."""

    registered = False


_LIFETIME = _Lifetime()


def children_die_with_us() -> None:
    """hivemind's DHT and averager processes die with this one, even on SIGKILL.

    Without it a killed peer or coordinator leaves its DHT process and p2p daemon running, still holding its port
    and identity, so a restart on the same --host-port fails and other peers keep seeing a ghost peer.
    """
    if not _LIFETIME.registered:
        multiprocessing.util.register_after_fork(_LIFETIME, _die_with_parent)
        _LIFETIME.registered = True


def stop_all(processes: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL: nothing outlives the demo (or the test)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def descendants(root: int) -> list[tuple[int, str]]:
    """Every process below ``root`` as (pid, name), read from /proc (empty where there is no /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            try:
                found.append((child, Path(f"/proc/{child}/comm").read_text().strip()))
            except OSError:
                continue
            todo.append(child)
    return found


def kill_and_reap(pid: int) -> None:
    """SIGKILL ``pid`` and collect its exit status when it is our child (else init or its parent does)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


@contextmanager
def adopting_orphans() -> Iterator[None]:
    """While the block runs, orphaned descendants become this process's children instead of init's (Linux
    ``PR_SET_CHILD_SUBREAPER``); on the way out every ``p2pd`` started meanwhile is stopped and reaped.

    Why: a DHT process that dies during its start (a failed bootstrap, our terminate) leaves its ``p2pd`` behind,
    and one still dialing an unresponsive peer outlives it. Elsewhere than Linux this only sweeps what it can see.
    """
    before = {pid for pid, _ in descendants(os.getpid())}
    previous = ctypes.c_int(0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        adopted = libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(previous)) == 0
        adopted = adopted and libc.prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    except (AttributeError, OSError):  # not Linux
        libc, adopted = None, False
    try:
        yield
    finally:
        for pid, name in descendants(os.getpid()):
            if name == "p2pd" and pid not in before:
                kill_and_reap(pid)
        if adopted and libc is not None:  # adopted: libc was loaded
            libc.prctl(PR_SET_CHILD_SUBREAPER, previous.value)


def in_background(function: Callable[..., Any], *args: Any) -> Callable[[float | None], Any]:
    """Start ``function(*args)`` in a daemon thread; the returned ``wait(timeout)`` gives its result, raises its
    exception, or raises TimeoutError. A thread still blocked (a DNS lookup, a silent server) cannot delay our exit.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function(*args)
        except BaseException as err:  # handed to the waiting thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name=f"vitpeer-{function.__name__}", daemon=True)
    thread.start()

    def wait(timeout: float | None) -> Any:
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"{function.__name__} did not finish within {timeout} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    return wait
