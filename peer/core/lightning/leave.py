"""Leaving a swarm cleanly on SIGTERM (``docker stop``, systemd, Kubernetes) or Ctrl-C.

The first signal asks the peer to leave: it starts no more state-averaging rounds, finishes the local step it is in
(with the gradient round the others wait for), Lightning stops (``trainer.should_stop``), the last checkpoint is written
(whole: see ``AtomicCheckpointIO``), hivemind says goodbye (its progress record expires at once, so the others stop
counting this peer) and the DHT and its p2p daemon are shut down; the command exits 0. When a round waits for peers
that are gone, that could take ``swarm.averaging_timeout``: after ``DEADLINE`` seconds the peer says goodbye, stops
its DHT and exits 0 without finishing the step (the last checkpoint is the one written before). A second signal
exits at once, with 128 + the signal's number, as a shell reports a killed command.

Lightning installs its own SIGTERM handler while it fits, which ends a run with an exception and exit code 1;
``LeaveOnSignal`` takes SIGTERM back at the start of training. Every local rank of a multi-device peer gets the
leader's decision with its step broadcast (``core.lightning.local_ranks``), so all ranks stop at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEADLINE = 7.0
"""Seconds a clean leave may take before the peer leaves without finishing its step: inside Docker's 10 s grace."""
LAST_WORDS = 2.0
"""Seconds the actions past the deadline (goodbye, stopping the DHT) may take before the process exits anyway."""


class LeaveOnSignal(pl.Callback):
    """Sets ``requested`` on the first SIGTERM/SIGINT, exits the process on the second. ``install`` it as soon as
    the run starts; as a callback it installs itself again when training starts, after Lightning's own handler."""

    def __init__(self):
        self.requested = threading.Event()
        self.pid = os.getpid()
        self.while_leaving: list[Callable[[], None]] = []
        """Run every half second from a helper thread once a leave is requested (not in the signal handler, which
        interrupts the training loop wherever it is): e.g. ``SwarmSteps.stop_averaging_state``."""
        self.settled = threading.Event()
        """Set once training has ended: from then on the main thread finishes the leave, with no deadline."""
        self.past_deadline: list[Callable[[], None]] = []
        """Run from that thread when the clean leave has not ended in ``DEADLINE`` seconds (a round that waits for
        peers that are gone): say goodbye, stop the DHT and its p2p daemon; then the process exits 0 with the last
        checkpoint written before the signal."""

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for signum in SIGNALS:
                signal.signal(signum, self._handle)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.install()

    def _handle(self, signum: int, _frame: Any) -> None:
        if os.getpid() != self.pid:  # a child forked after install (hivemind's DHT, its averagers): default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        if self.requested.is_set():
            log.warning("%s again: exiting now, without a clean leave", name)
            os._exit(128 + signum)
        self.requested.set()
        log.info("%s: leaving the swarm after this step (a second signal exits at once)", name)
        threading.Thread(target=self._keep_leaving, name="vitpeer-leave", daemon=True).start()

    def _keep_leaving(self) -> None:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            self._run(self.while_leaving)
            if self.settled.wait(0.5):  # training ended: the clean leave finishes on the main thread
                return
        log.warning(
            "the clean leave did not end in %.0f s (a round waits for peers): leaving now, with the last "
            "checkpoint written before the signal",
            DEADLINE,
        )
        # they talk to hivemind's DHT process, which may no longer answer (its pipe broken): bounded, then exit
        last_words = threading.Thread(target=self._run, args=(self.past_deadline,), name="vitpeer-goodbye", daemon=True)
        last_words.start()
        last_words.join(LAST_WORDS)
        if last_words.is_alive():
            log.warning("the goodbye did not finish in %.0f s: exiting without it", LAST_WORDS)
        os._exit(0)

    @staticmethod
    def _run(actions: list[Callable[[], None]]) -> None:
        for action in actions:
            try:
                action()
            except Exception as err:  # one failed action must not stop the leave
                log.warning("while leaving: %r", err)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, then renames it into place: a peer stopped or killed while
    saving leaves the previous complete checkpoint, never a half-written one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)
