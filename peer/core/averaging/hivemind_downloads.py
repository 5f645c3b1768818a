"""The adapter room's state downloads (see ``hivemind_averagers`` for the room): what hivemind 1.1.12's download
of a peer's state is changed to do, and the private names it touches.

- ``_LoadDeadline`` ends hivemind's endless retry loop of state downloads. It replaces the averagers' public
  ``load_state_from_peers``, but it changes what hivemind's own loop does. Each download is armed with its own
  deadline before hivemind's loop starts; the loop's retries keep it.
- ``_CheckedDownload``, mixed into ``TrainingStateAverager`` and ``GroupSizedAverager``: a downloaded state is
  checked (``StateCheck``) before anyone takes it, inside hivemind's private ``_load_state_from_peers`` (the
  averager's process), which it wraps; the check for each download travels there through ``_outer_pipe``
  (``_arm_state_check``). A refused state raises where hivemind catches a failed peer, so hivemind's own loop goes on
  to the peer with the next priority. In the averager's process it also lends the averager module's global
  ``aiter_with_timeout`` (used there by the download loop alone) ``_budgeted``, which cuts off a sender past the
  state's byte budget or under a minimum rate. And it replaces the private ``_declare_for_download_periodically``
  (the loop that offers this averager's state in the DHT), which stored a signed record whenever the private
  ``_state_updated`` event fired: hivemind fires it for every tensor a round averages.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from contextvars import ContextVar
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from hivemind.averaging import averager as averager_module
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout

from vitpeer.peer.core.averaging.remote_state import StateCheck, StateRefused

log = logging.getLogger(__name__)


class _LoadDeadline:
    """Wraps an averager's ``load_state_from_peers`` so hivemind's retry loop ends at a deadline.

    ``hivemind.Optimizer.load_state_from_peers`` retries forever while downloads fail (hivemind#453, #653). Before
    the deadline a failure propagates (hivemind retries); after it, the failure is logged and swallowed, so hivemind's
    loop ends and the peer goes on from its local state. Each attempt's own timeout is cut to the time left.

    ``arm`` starts a new download: its deadline is ``timeout`` after its first attempt, and every retry hivemind makes
    until the next ``arm`` shares it. A call without ``arm`` before it (a download outside ``SwarmOptimizer``) is a
    new download of its own.
    """

    def __init__(self, load_state_from_peers: Callable[..., Any], timeout: float):
        self.load, self.timeout = load_state_from_peers, timeout
        self.deadline: float | None = None  # None: the next attempt begins a new download
        self.armed = False
        self.gave_up = False  # the last download ended at the deadline without a state

    def arm(self) -> None:
        """The next call begins a new download with the full ``timeout``."""
        self.deadline, self.armed, self.gave_up = None, True, False

    def __call__(self, wait: bool = True, timeout: float | None = None) -> Any:  # the signature of what it replaces
        now = time.monotonic()
        if self.deadline is None or not self.armed:
            self.deadline, self.gave_up = now + self.timeout, False
        timeout = max(1.0, min(timeout or self.timeout, self.deadline - now))
        try:
            return self.load(wait=wait, timeout=timeout)
        except Exception as err:
            if time.monotonic() < self.deadline:
                raise
            log.warning("giving up loading state from peers after %.0f s (%r); training on", self.timeout, err)
            self.gave_up = True
            return None


def _refused(counter, error: Exception, message: str) -> Exception:
    """Count a refused state in ``counter`` (shared memory) and say so; the error to raise where hivemind catches a
    failed peer, so it asks the peer with the next priority."""
    with counter.get_lock():
        counter.value += 1
    log.warning(message + "; trying the next peer", error)
    return error


class _CheckedResult:
    """Stands for hivemind's future in its download loop: a state that fails ``check`` raises where hivemind catches
    a failed peer, so hivemind tries the peer with the next priority; one that passes goes to ``future``."""

    def __init__(self, future, check: StateCheck | None, refused):
        self.future, self.check, self.refused = future, check, refused

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, result) -> None:
        if result is not None and self.check is not None:
            reason = self.check.refusal(*result)
            if reason is not None:
                raise _refused(self.refused, StateRefused(reason), "refused a state from a peer: %s")
        self.future.set_result(result)


MIN_DOWNLOAD_RATE = 64 * 1024
"""Bytes per second a state's sender must keep up, measured from its first message once ``RATE_GRACE`` has passed:
a sender trickling one small message just inside hivemind's per-message timeout held a joiner until its whole
``load_state_timeout`` ran out, and the honest peers after it were never asked."""
RATE_GRACE = 5.0
_budget: ContextVar[tuple[int | None, Any] | None] = ContextVar("vitpeer_download_budget", default=None)


class DownloadCut(ConnectionError):
    """A state's sender went past the download's byte budget or fell under its minimum rate: the next one is asked."""


async def _budgeted(stream, timeout: float | None):
    """hivemind's ``aiter_with_timeout`` over a state download's messages, with the budget its download armed: at
    most ``StateCheck.max_bytes``, at least ``MIN_DOWNLOAD_RATE``. Raises ``DownloadCut`` where hivemind catches a
    failed peer."""
    armed = _budget.get()
    started, received = None, 0
    async for message in aiter_with_timeout(stream, timeout):
        if armed is not None:
            max_bytes, refused = armed
            started = started if started is not None else time.monotonic()
            received += message.ByteSize()
            elapsed = time.monotonic() - started
            why = None
            if max_bytes is not None and received > max_bytes:
                why = f"sent over {max_bytes} bytes, more than this run's state can take"
            elif elapsed > RATE_GRACE and received < MIN_DOWNLOAD_RATE * elapsed:
                why = f"sent {received} bytes in {elapsed:.0f} s, under {MIN_DOWNLOAD_RATE} bytes/s"
            if why is not None:
                raise _refused(refused, DownloadCut(why), "cut off a state download: the peer %s")
        yield message


class _CheckedDownload:
    """An averager that checks every state it downloads before handing it on (mixed into hivemind's averagers).

    hivemind's download (``DecentralizedAverager._load_state_from_peers``, in the averager's process) asks the peers
    in order of their announced priority and hands on the first state it receives, whatever it holds; its callers
    (``TrainingStateAverager.load_state_from_peers``, ``DiLoCo``, the coordinator) would then apply it. Here the
    state is checked in that loop, against the ``StateCheck`` that ``state_check`` (set by the owner, in this
    process) builds for each download, so a refused peer is skipped and the next one asked. ``refused_states``
    counts the refusals (a counter in shared memory, written in the averager's process)."""

    state_check: Callable[[], StateCheck | None] | None = None
    """Builds the check for the next download (in the host process, when the download begins)."""
    _outer_pipe: Connection  # the averager's: hivemind's command pipe to its process

    def __init__(self, *args, **kwargs):
        self._refused = mp.Value(ctypes.c_int, 0)  # before super() starts the averager's process: it is shared
        self._check: StateCheck | None = None  # the averager process's copy, armed for each download
        super().__init__(*args, **kwargs)

    @property
    def refused_states(self) -> int:
        """States refused since this averager started."""
        return self._refused.value

    def load_state_from_peers(self, *args, **kwargs):
        check = self.state_check() if self.state_check is not None else None
        # pipe messages run in order in the averager's process: the check is in place before the download begins
        self._outer_pipe.send(("_arm_state_check", [check], {}))
        return super().load_state_from_peers(*args, **kwargs)  # pyright: ignore[reportAttributeAccessIssue]  # the averager's, next in the MRO

    async def _arm_state_check(self, check: StateCheck | None) -> None:  # runs in the averager's process
        self._check = check

    async def _load_state_from_peers(self, future, timeout: float | None = None):  # runs in the averager's process
        checked = _CheckedResult(future, self._check, self._refused)
        armed = _budget.set((self._check.max_bytes if self._check is not None else None, self._refused))
        try:  # the budget is this task's: hivemind streams each sender's messages through ``_budgeted`` in it
            await super()._load_state_from_peers(checked, timeout=timeout)  # pyright: ignore[reportAttributeAccessIssue]  # the averager's, next in the MRO
        finally:
            _budget.reset(armed)

    async def _declare_for_download_periodically(self) -> NoReturn:  # the averager's process
        """Offer this averager's state to joiners (``<prefix>.all_averagers``, subkey: this peer, value: its priority;
        None withdraws it) when the offer changes, and again every half ``declare_state_period`` so that it never
        lapses. hivemind's loop stored it again at each ``_state_updated``, which its rounds set once per tensor they
        average: measured 2026-12-07 (2 peers, demo config), about 60 signed DHT stores a round, 13 a second."""
        averager: Any = self  # hivemind's DecentralizedAverager, next in the MRO: its dht, peer_id, settings, event
        key = f"{averager._matchmaking.group_key_manager.prefix}.all_averagers"
        period = averager.declare_state_period
        declared: tuple[bool, float] | None = None
        renew_at = 0.0
        while True:
            offer = (bool(averager.allow_state_sharing), float(averager.state_sharing_priority))
            now = get_dht_time()
            if (offer != declared or now >= renew_at) and (offer[0] or (declared is not None and declared[0])):
                value = offer[1] if offer[0] else None
                subkey = averager.peer_id.to_bytes()
                store = averager.dht.store(
                    key, subkey=subkey, value=value, expiration_time=now + period, return_future=True
                )
                asyncio.create_task(asyncio.wait_for(store, timeout=period))
                declared, renew_at = offer, now + period / 2
            elif now >= renew_at:  # nothing to offer: look again in half a period at the latest
                renew_at = now + period / 2
            averager._state_updated.clear()
            try:  # set by a new offer (hivemind's setters), and by every averaged tensor
                await asyncio.wait_for(averager._state_updated.wait(), timeout=max(0.0, renew_at - get_dht_time()))
            except asyncio.TimeoutError:
                pass

    def run(self) -> None:  # the averager's process
        averager_module.aiter_with_timeout = _budgeted  # hivemind's download loop is its one user in that module
        super().run()  # pyright: ignore[reportAttributeAccessIssue]  # hivemind's DecentralizedAverager.run, next in the MRO
