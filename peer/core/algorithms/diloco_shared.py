"""The shared state of a ``diloco`` peer: ``shared`` and the outer momentum, synced exactly with the others, served to
joiners and downloaded when this peer is behind (``SharedState``, the half of ``DiLoCo`` that owns them)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import hivemind
import torch
from hivemind.optim.progress_tracker import ProgressTracker

from vitpeer.peer.core.averaging.aggregation import refusal
from vitpeer.peer.core.averaging.hivemind_averagers import GroupSizedAverager
from vitpeer.peer.core.averaging.remote_state import StateCheck, download_bound

SEARCH_WINDOW = 2.0
"""A round or a sync looks for its group for at most this many ``matchmaking_time``s (hivemind's ``timeout``: to
find a group; the all-reduce then has ``averaging_timeout``). A group whose peers are all in closes at once. Until
2026-12-07 the window was ``matchmaking_time + averaging_timeout`` (17 s for the demo): a peer that entered a sync
while the other entered a round, or a round the other had already left, blocked both for 15-17 s, twice in a
70 s measurement, nearly half of what a 2-peer swarm could have committed."""

SYNC_BOUND = 2.0
"""An exact sync's result may be at most this far from this peer's own shared state, relative to that state's length;
a farther one is rejected. Loose on purpose: a sync exists to bring together peers that trained apart (a peer alone
for the first swarm steps ended 0.82 of its length away from a fresh joiner's), so this catches only garbage."""

log = logging.getLogger(__name__)


class OuterAverager(GroupSizedAverager):
    """hivemind's averager over the pseudo-gradients; serves the shared state to peers that download it."""

    def __init__(self, serve_state, **kwargs):
        self._serve_state = serve_state
        super().__init__(**kwargs)

    def get_current_state(self):  # hivemind calls it (in this process) when another peer downloads the state
        return self._serve_state()


class SharedState:
    """The half of ``DiLoCo`` that owns the shared state; ``DiLoCo`` builds what is declared here."""

    params: list[torch.Tensor]
    """The module's parameters (the local ones), rebased in place when the shared state moves."""
    shared: list[torch.Tensor]
    """This peer's copy of the swarm's shared parameters (fp32, host memory)."""
    outer: torch.optim.SGD
    """The outer optimizer over ``shared``; its momentum is part of the shared state."""
    lock: threading.Lock
    """Guards ``shared`` and the momentum: the trainer writes them, hivemind's thread serves them to joiners."""
    averager: OuterAverager
    syncer: GroupSizedAverager
    tracker: ProgressTracker
    dht: hivemind.DHT
    run_id: str
    epoch: int
    samples: int
    max_steps: int | None
    matchmaking_time: float
    averaging_timeout: float
    load_state_timeout: float
    sync_every: int
    sync_momentum: bool
    out_of_step: bool
    last_alone: bool
    in_flight: Any
    wait_seconds: float
    client_mode: bool

    @property
    def num_peers(self) -> int:
        return self.tracker.global_progress.num_peers

    def _rebase(self, base: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError  # ``DiLoCo``'s

    def _offer_state(self) -> None:
        raise NotImplementedError  # ``DiLoCo``'s

    def _sync_due(self, step: int) -> bool:
        """Whether the round that ends at swarm step ``step`` begins with a sync of ``shared``: every ``sync_every``,
        and after a round that left this peer out of step (see the module docstring). Peers decide from the step or
        from what they saw of the same round, so they meet in it (a peer that counts no other peer skips it). The
        final sync is ``finish``'s."""
        apart = self.out_of_step or (self.last_alone and self.num_peers > 1)
        return step % self.sync_every == 0 or apart

    def outer_state(self) -> tuple[dict, list[torch.Tensor]]:
        """(metadata, tensors) of the shared state: the swarm step, ``shared`` and the outer momentum."""
        with self.lock:
            momentum = [self.outer.state.get(s, {}).get("momentum_buffer") for s in self.shared]
            momentum = [
                torch.zeros_like(s) if m is None else m.clone() for s, m in zip(self.shared, momentum, strict=True)
            ]
            return {"epoch": self.epoch}, [s.clone() for s in self.shared] + momentum

    def _set_outer_state(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace ``shared`` and the outer momentum with ``tensors`` (``outer_state``'s layout)."""
        count = len(self.shared)
        with torch.no_grad(), self.lock:
            for s, value in zip(self.shared, tensors[:count], strict=True):
                s.copy_(value)
            for s, value in zip(self.shared, tensors[count:], strict=True):
                self.outer.state[s]["momentum_buffer"] = value.clone()

    def _take_outer_state(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace ``shared`` and the momentum, and move the local parameters with them."""
        base = [s.clone() for s in self.shared]
        self._set_outer_state(tensors)
        self._rebase(base)

    def sync_shared(self) -> bool:
        """Average ``shared`` and the outer momentum exactly (fp32) with the peers that meet here; a peer that counts
        no other peer skips it."""
        self.out_of_step = self.last_alone = False  # one try: a peer that meets no one waits for the next sync
        if self.num_peers <= 1:
            return False
        started = time.perf_counter()
        _, full = self.outer_state()
        state = full if self.sync_momentum else full[: len(self.shared)]
        with self.syncer.get_tensors() as buffers:  # pyright: ignore[reportGeneralTypeIssues]  # hivemind annotates this context manager as the tensors it yields
            for buffer, value in zip(buffers, state, strict=True):
                buffer.copy_(value)
        self.syncer.set_group_size(max(2, self.num_peers))
        try:  # one matchmaking window, no retries: a peer that is alone loses only that
            gathered = self.syncer.step(timeout=SEARCH_WINDOW * self.matchmaking_time, allow_retries=False)
        except Exception as err:
            gathered = None
            log.debug("syncing the shared state failed: %r", err)
        if gathered:
            with self.syncer.get_tensors() as buffers:  # pyright: ignore[reportGeneralTypeIssues]  # hivemind annotates this context manager as the tensors it yields
                synced = [buffer.clone() for buffer in buffers]
            why = refusal(synced, state, SYNC_BOUND, apart=True)
            if why is not None:
                log.warning("rejected the synced shared state: %s", why)
                gathered = None
            else:
                self._take_outer_state(synced if self.sync_momentum else synced + full[len(self.shared) :])
        self.wait_seconds += time.perf_counter() - started
        return bool(gathered)

    def expected_state(self) -> StateCheck:
        """What a downloaded shared state must be: ``shared`` and the momentum (fp32, this peer's shapes), at most
        ``EPOCH_AHEAD`` swarm steps past the newest this peer sees and never past ``max_steps`` (``download_bound``)."""
        layout = tuple((s.shape, torch.float32) for s in self.shared) * 2
        return StateCheck(layout=layout, max_epoch=download_bound(self.dht, self.run_id, self.epoch, self.max_steps))

    @property
    def refused_states(self) -> int:
        """Downloaded states refused so far (``remote_state.StateCheck``): never applied."""
        return self.averager.refused_states

    def load_state_from_peers(self) -> bool:
        """Download the shared state within ``load_state_timeout``; True if it moved this peer. Every state is
        checked before it is taken (``expected_state``): a refused one is skipped for the peer with the next
        priority."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.load_state_timeout
        loaded, empty = None, 0
        while loaded is None and empty < 3 and time.monotonic() < deadline:
            refused = self.refused_states
            try:
                loaded = self.averager.load_state_from_peers(timeout=max(1.0, deadline - time.monotonic()))
                empty += loaded is None  # nobody offered a state (a new swarm), or every offer failed
            except Exception as err:  # a download timed out: try again until the deadline
                log.debug("a state download failed: %r", err)
            if loaded is None and self.refused_states > refused:
                break  # every peer that answered sent a state that was refused: asking them again changes nothing
            if loaded is None and time.monotonic() < deadline:
                time.sleep(0.5)
        self.wait_seconds += time.perf_counter() - started
        if loaded is None:
            log.info("no peer offered an acceptable shared state; training on from this peer's own")
            return False
        metadata, tensors = loaded
        if int(metadata["epoch"]) < self.epoch:  # e.g. only the coordinator serves, a step behind: keep our own
            log.info("the offered shared state (swarm step %s) is older than ours: kept ours", metadata["epoch"])
            return False
        self.in_flight = None  # a round of an older step: its result no longer applies
        self._take_outer_state(tensors)
        with self.tracker.pause_updates():
            self.epoch = self.tracker.update_epoch(max(self.epoch, int(metadata["epoch"])))
        self.samples = 0
        self._offer_state()
        log.info("loaded the swarm's state at step %s in %.1f s", metadata["epoch"], time.perf_counter() - started)
        return True

    def restore(self, epoch: int, tensors: Sequence[torch.Tensor]) -> None:
        """A checkpoint's shared state (the local parameters come back with the module's own weights)."""
        self._set_outer_state(tensors)
        with self.tracker.pause_updates():
            self.epoch = self.tracker.update_epoch(epoch)
        self._offer_state()  # a trained state: worth offering
