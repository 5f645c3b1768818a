"""The run's state as an observer (the coordinator) holds it: downloaded from peers, checkpointed, served to joiners.

The coordinator speaks the state protocol of the run's algorithm (``swarm.algorithm``), one class each behind one
interface (``SwarmState``; each algorithm's ``observe`` builds its own):

- ``GradientState``: a hivemind ``TrainingStateAverager`` under the prefix of the peers' ``hivemind.Optimizer``
  (``<run_id>_state_averager``), with the same tensors in the same order: parameters, optimizer statistics, swarm step.
- ``DiLoCoState``: the ``OuterAverager`` of ``core.algorithms.diloco`` under ``<run_id>_diloco``: the shared
parameters (fp32)
  then the outer momentum, both in the order of the module's optimizer parameter groups (``DiLoCo.outer_state``),
  and the swarm step as ``{"epoch": N}``. The peers' own inner optimizers are theirs alone: nothing to keep.

Either way the coordinator never joins an averaging round (it never calls ``step``); it only

- downloads the state from the most advanced peer (``download``) into its network (``net``) for evaluation and export,
  after the check every peer makes (``remote_state.StateCheck``: this run's shapes and dtypes, no NaN or Inf,
  a swarm step at most ``EPOCH_AHEAD`` past the newest in the peers' progress records); a refused state is never
  written, and the peer with the next priority is asked,
- writes it as a checkpoint (``state_dict``) and reads it back after a restart (``load_state_dict``), and
- offers its own copy to peers that join (``share``), with a priority just below a live peer at the same step, so a
  joiner asks live peers first and the coordinator when everyone has left.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, TypeVar

import hivemind
import pytorch_lightning as pl
import torch

from vitpeer.peer.core.algorithms.diloco_shared import OuterAverager
from vitpeer.peer.core.averaging.hivemind_averagers import (
    GroupSizedAverager,
    TrainingStateAverager,
    catch_up_scheduler,
)
from vitpeer.peer.core.averaging.hivemind_optimizer import factory_form
from vitpeer.peer.core.averaging.quantization import compression
from vitpeer.peer.core.averaging.remote_state import StateCheck, download_bound, training_state_check
from vitpeer.peer.core.config import ConfigError, RunConfig
from vitpeer.peer.core.data import num_classes
from vitpeer.peer.core.model import ImageClassifier, build_model

log = logging.getLogger(__name__)

Averager = TypeVar("Averager", bound="TrainingStateAverager | GroupSizedAverager")
"""The averager class a ``SwarmState`` downloads and serves with: one of ours, which check what they download."""


class SwarmState(Generic[Averager]):
    """The run's network and swarm step as the coordinator last saw them, and the averager that moves them.

    Subclasses speak one algorithm's protocol; ``run.py`` uses only what is defined here."""

    algorithm: str
    """``swarm.algorithm`` of the runs this class serves; written into every checkpoint."""
    averager: Averager
    """Downloads the state and serves it, under the prefix the peers of ``algorithm`` use."""

    def __init__(self, config: RunConfig):
        self.run_id = config.swarm.run_id
        pl.seed_everything(config.trainer.seed, verbose=False)
        model = config.model.model_copy(update={"pretrained": False, "weights": None})  # weights come from peers
        self.num_classes = num_classes(config.data)
        self.net = build_model(model, self.num_classes)
        built = ImageClassifier(
            self.net, self.num_classes, config.optim, config.trainer.max_steps
        ).configure_optimizers()
        schedule = built["lr_scheduler"]
        if not isinstance(schedule, dict):  # Lightning also takes a bare scheduler; the module returns its config
            raise TypeError(f"ImageClassifier.configure_optimizers returned a bare {type(schedule).__name__}")
        self.optimizer, self.scheduler = built["optimizer"], schedule["scheduler"]
        """The module's optimizer and schedule, as every peer builds them: their parameter groups fix the order in
        which peers send the parameters."""

    @property
    def epoch(self) -> int:
        raise NotImplementedError

    def download(self, timeout: float) -> bool:
        """Fetch the newest state from the peers within ``timeout`` s; True if it moved us to a newer step."""
        raise NotImplementedError

    @property
    def refused_states(self) -> int:
        """States peers sent that failed the check (``remote_state.StateCheck``): never taken nor written."""
        return self.averager.refused_states

    def furthest_epoch(self) -> int | None:
        """The newest swarm step a downloaded state may have (``download_bound``): ``EPOCH_AHEAD`` past the newest
        step in the peers' progress records. The coordinator sets no ``max_steps`` cap: it follows whatever the peers
        train, and its config's ``trainer.max_steps`` is not theirs to share (the fingerprint leaves it out). Without
        progress records there is no swarm to download from (``run.py`` downloads when the reports show progress)."""
        return download_bound(self.averager.dht, self.run_id, self.epoch)

    def _report_refusals(self, before: int) -> None:
        if self.refused_states > before:
            log.warning(
                "refused %d state(s) peers sent (other shapes or dtypes, NaN or Inf, or a swarm step too far ahead; "
                "%d so far): not written",
                self.refused_states - before,
                self.refused_states,
            )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds: ``algorithm``, ``model`` (the network's state dict), ``swarm_epoch``, and the
        algorithm's own optimizer state."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint (after a coordinator restart) and serve it."""
        written_by = state.get("algorithm", "gradient")  # checkpoints from before the diloco coordinator
        if written_by != self.algorithm:
            raise ConfigError(
                f"the checkpoints in this state directory are of a {written_by!r} run, and swarm.algorithm is "
                f"{self.algorithm!r}: give this run its own --state-dir"
            )

    def share(self) -> None:
        """Offer this state to joining peers (below a live peer at the same step, above any peer behind it)."""
        self.averager.state_sharing_priority = self.epoch - 0.5
        self.averager.allow_state_sharing = True

    def shutdown(self) -> None:
        self.averager.shutdown()


class GradientState(SwarmState[TrainingStateAverager]):
    """``swarm.algorithm = gradient``: model, optimizer and swarm step (hivemind epoch) in a
    ``TrainingStateAverager``."""

    algorithm = "gradient"

    def __init__(self, config: RunConfig, dht: hivemind.DHT):
        super().__init__(config)
        params, optimizer, scheduler = factory_form(self.optimizer, self.scheduler)
        self.averager = TrainingStateAverager(
            dht=dht,
            prefix=f"{config.swarm.run_id}_state_averager",  # hivemind.Optimizer's prefix for the same state
            params=params,
            optimizer=optimizer,
            scheduler=scheduler,
            state_compression=compression(config.swarm.wire_compression),
            allow_state_sharing=False,  # nothing worth serving until a download or a checkpoint
            start=True,
        )
        self.averager.state_check = lambda: training_state_check(self.averager, self.furthest_epoch())

    @property
    def epoch(self) -> int:
        return self.averager.local_epoch

    def download(self, timeout: float) -> bool:
        before, refused = self.epoch, self.refused_states
        try:
            with _scheduler_catch_up():
                self.averager.load_state_from_peers(timeout=timeout)
        except FutureTimeout as err:
            raise TimeoutError(f"no peer sent its state within {timeout:.0f} s") from err
        finally:
            self._report_refusals(refused)
        if self.epoch <= before:
            return False
        self.share()
        return True

    def state_dict(self) -> dict[str, Any]:
        with self.averager.lock_averaged_tensors:
            return {
                "algorithm": self.algorithm,
                "model": self.net.state_dict(),
                "optimizer": self.averager.optimizer.state_dict(),
                "swarm_epoch": self.epoch,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad(), self.averager.lock_averaged_tensors:
            self.net.load_state_dict(state["model"])
            self.averager.optimizer.load_state_dict(state["optimizer"])
        self.averager.local_epoch = int(state["swarm_epoch"])
        with _scheduler_catch_up():
            catch_up_scheduler(self.averager)  # hivemind's own catch-up: scheduler steps == local epoch
        self.share()


class DiLoCoState(SwarmState[OuterAverager]):
    """``swarm.algorithm = diloco``: the shared parameters (kept in ``net``), the outer momentum and the swarm step,
    downloaded and served in ``DiLoCo.outer_state``'s layout."""

    algorithm = "diloco"

    def __init__(self, config: RunConfig, dht: hivemind.DHT):
        super().__init__(config)
        self.params = [param for group in self.optimizer.param_groups for param in group["params"]]
        """The network's parameters in the order peers send them (``DiLoCo`` takes the same groups' parameters)."""
        self.momentum = [torch.zeros_like(param, dtype=torch.float32) for param in self.params]
        self._epoch = 0
        self.lock = threading.Lock()  # the poll thread downloads; hivemind's thread serves (``_served``)
        self.averager = OuterAverager(  # the peers' class: hivemind names the download protocol after it
            self._served,
            averaged_tensors=[torch.zeros(1)],  # never averages: what it serves is ``_served``'s
            dht=dht,
            prefix=f"{config.swarm.run_id}_diloco",  # DiLoCo's prefix for the same state
            allow_state_sharing=False,  # nothing worth serving until a download or a checkpoint
            start=True,
        )
        self.averager.state_check = lambda: self.expected_state(self.furthest_epoch())

    @property
    def epoch(self) -> int:
        return self._epoch

    def expected_state(self, max_epoch: int | None) -> StateCheck:
        """A shared state in ``DiLoCo.outer_state``'s layout: this network's shapes in fp32, twice."""
        return StateCheck(layout=tuple((param.shape, torch.float32) for param in self.params) * 2, max_epoch=max_epoch)

    def download(self, timeout: float) -> bool:
        refused = self.refused_states
        try:
            loaded = self.averager.load_state_from_peers(timeout=timeout)
        except FutureTimeout as err:
            raise TimeoutError(f"no peer sent its state within {timeout:.0f} s") from err
        finally:
            self._report_refusals(refused)
        if loaded is None:  # no peer offers its state, or every offer failed
            return False
        metadata, tensors = loaded
        epoch = int(metadata["epoch"])
        if epoch <= self.epoch:
            return False
        self._take(epoch, tensors[: len(self.params)], tensors[len(self.params) :])
        self.share()
        return True

    def state_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "algorithm": self.algorithm,
                "model": self.net.state_dict(),  # the shared parameters (fp32, as the coordinator's network is)
                "outer_momentum": [momentum.clone() for momentum in self.momentum],
                "swarm_epoch": self.epoch,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        name_of = {param: name for name, param in self.net.named_parameters()}
        shared = [state["model"][name_of[param]] for param in self.params]
        self._take(int(state["swarm_epoch"]), shared, state["outer_momentum"])
        self.share()

    def _take(self, epoch: int, shared: Sequence[torch.Tensor], momentum: Sequence[torch.Tensor]) -> None:
        """Take ``shared`` into the network and ``momentum`` as the outer momentum, at swarm step ``epoch``; refuse
        (``StateRefused``, a ValueError) a state that fails the peers' check (downloads are checked before they get
        here; a checkpoint file is checked here)."""
        self.expected_state(max_epoch=None).verify({"epoch": epoch}, [*shared, *momentum])
        with torch.no_grad(), self.lock:
            for param, value in zip(self.params, shared, strict=True):
                param.copy_(value)
            self.momentum = [value.to(torch.float32, copy=True) for value in momentum]
            self._epoch = epoch

    def _served(self) -> tuple[dict[str, int], list[torch.Tensor]]:
        """(metadata, tensors) for a joining peer, in ``DiLoCo.outer_state``'s layout."""
        with torch.no_grad(), self.lock:
            shared = [param.detach().to(torch.float32, copy=True) for param in self.params]
            return {"epoch": self.epoch}, shared + [momentum.clone() for momentum in self.momentum]


@contextlib.contextmanager
def _scheduler_catch_up():
    """Stepping the LR scheduler to the loaded step without optimizer steps is intended here: silence torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        yield
