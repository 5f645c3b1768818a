"""``--resume`` keeps each swarm optimizer's state where that optimizer holds it.

Lightning moves a restored optimizer's state to the module's device. The ``gradient`` algorithm's hivemind optimizer
is offloaded: it steps host copies of the parameters, so its statistics belong in host memory. DiLoCo's inner optimizer
steps the module's parameters, so its statistics go with them; the outer ``shared`` parameters and momentum stay in
host memory. One real peer alone on 127.0.0.1 trains 2 swarm steps, checkpoints, and resumes for one more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from fits import fit

from vitpeer.peer.core.algorithms.diloco_optimizer import DiLoCoOptimizer
from vitpeer.peer.core.config import ConfigError, load_config
from vitpeer.peer.core.config.preflight import check_resume_algorithm
from vitpeer.peer.core.lightning.strategy import HivemindStrategy
from vitpeer.peer.core.swarm.dht import start_dht

pytestmark = pytest.mark.timeout(240)

ALGORITHMS = ["gradient", "diloco"]


def swarm_config(tmp_path: Path, algorithm: str):
    return load_config(
        "digits_tiny",
        {
            "swarm.host_maddrs": ["/ip4/127.0.0.1/tcp/0"],
            "swarm.run_id": f"resume-devices-{tmp_path.name}",
            "swarm.algorithm": algorithm,
            "swarm.target_batch_size": 64,
            "trainer.max_steps": 8,
        },
    )


def state_devices(optimizer) -> dict[str, set[str]]:
    """Where a swarm optimizer's tensors live, by role: ``statistics`` (the optimizer state it steps with, but torch's
    ``step`` counters, which torch keeps on the host by design), ``stepped`` (the parameters that optimizer updates),
    and for DiLoCo ``outer`` (``shared`` and the outer momentum)."""
    if isinstance(optimizer, DiLoCoOptimizer):
        inner, outer = optimizer.opt, optimizer.diloco
        tensors = [*outer.shared, *(value for state in outer.outer.state.values() for value in state.values())]
        found = {"outer": {tensor.device.type for tensor in tensors}}
    else:
        inner, found = optimizer.opt, {}  # hivemind's optimizer over its host copies of the parameters
    statistics = [
        value
        for state in inner.state.values()
        for key, value in state.items()
        if key != "step" and isinstance(value, torch.Tensor)
    ]
    assert statistics, "the restored optimizer holds no statistics: nothing was checked"
    found["statistics"] = {value.device.type for value in statistics}
    found["stepped"] = {param.device.type for group in inner.param_groups for param in group["params"]}
    return found


def expected_devices(algorithm: str, module_device: str) -> dict[str, set[str]]:
    if algorithm == "gradient":  # offloaded: everything hivemind's optimizer touches is in host memory
        return {"statistics": {"cpu"}, "stepped": {"cpu"}}
    return {"statistics": {module_device}, "stepped": {module_device}, "outer": {"cpu"}}


class RestoresOnMeta(HivemindStrategy):
    """On a CPU: Lightning's device reads ``meta`` while the optimizer state is restored, where Lightning would move
    the state to (as it moves it to the GPU on a GPU), and records where the state is right after the restore."""

    restoring = False
    restored: dict[str, set[str]] | None = None

    @property
    def root_device(self) -> torch.device:
        return torch.device("meta") if self.restoring else super().root_device

    def load_optimizer_state_dict(self, checkpoint) -> None:
        self.restoring = True
        try:
            super().load_optimizer_state_dict(checkpoint)
        finally:
            self.restoring = False
        self.restored = state_devices(self.optimizer)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_leaves_the_optimizer_state_where_the_swarm_optimizer_holds_it(tmp_path: Path, algorithm: str):
    config = swarm_config(tmp_path, algorithm)
    dht = start_dht(config.swarm)
    try:
        fit(config, HivemindStrategy(config.swarm, dht), 2, tmp_path)
    finally:
        dht.shutdown()

    # resume as a restarted peer does: a new DHT node, a new strategy
    dht = start_dht(config.swarm)
    try:
        strategy = RestoresOnMeta(config.swarm, dht)
        trainer = fit(config, strategy, 3, tmp_path / "resumed", resume=tmp_path / "last.ckpt")
        assert strategy.restored == expected_devices(algorithm, "cpu")
        assert strategy.optimizer.local_epoch == 3 and trainer.global_step == 3  # and it trained on
    finally:
        dht.shutdown()


class RecordsDevicesAtStart(pl.Callback):
    """Where the module and the swarm optimizer's state are once the checkpoint is restored, before the first
    resumed step (Lightning's teardown moves both to the host after fit)."""

    def __init__(self):
        self.found: dict[str, set[str]] | None = None
        self.module: set[str] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.found = state_devices(trainer.strategy.optimizer)
        self.module = {param.device.type for param in pl_module.parameters()}


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_on_a_gpu_trains_on_with_the_state_where_each_optimizer_holds_it(tmp_path: Path, algorithm: str):
    config = swarm_config(tmp_path, algorithm)
    dht = start_dht(config.swarm)
    try:
        fit(config, HivemindStrategy(config.swarm, dht, device="cuda"), 2, tmp_path, accelerator="gpu")
    finally:
        dht.shutdown()

    dht = start_dht(config.swarm)
    try:
        strategy, started = HivemindStrategy(config.swarm, dht, device="cuda"), RecordsDevicesAtStart()
        trainer = fit(
            config, strategy, 4, tmp_path / "resumed", tmp_path / "last.ckpt", accelerator="gpu", callbacks=[started]
        )
        assert started.module == {"cuda"}
        assert started.found == expected_devices(algorithm, "cuda")
        assert strategy.optimizer.local_epoch == 4 and trainer.global_step == 4  # it trained on: 2 more swarm steps
        assert all(torch.isfinite(param).all() for param in trainer.lightning_module.parameters())
    finally:
        dht.shutdown()


def test_a_checkpoint_of_the_other_algorithm_is_refused_naming_both(tmp_path: Path):
    """It failed with a KeyError inside Lightning's restore; now preflight refuses it in one line."""
    diloco = {"inner": {}, "swarm_epoch": 3, "outer_state": []}  # what DiLoCoOptimizer.state_dict holds
    gradient = {"state": {"local_epoch": 3}, "param_groups": []}  # what hivemind's Optimizer.state_dict holds
    for name, state in (("diloco", diloco), ("gradient", gradient)):
        path = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": {}, "optimizer_states": [state]}, path)
        check_resume_algorithm(path, name)  # its own algorithm: accepted
        other = "gradient" if name == "diloco" else "diloco"
        with pytest.raises(ConfigError, match=f"written by a {name} swarm.*'{other}'.*--algorithm {name}"):
            check_resume_algorithm(path, other)
    plain = tmp_path / "train.ckpt"  # a `vitpeer train` checkpoint: a plain optimizer, no swarm state to mismatch
    torch.save({"state_dict": {}, "optimizer_states": [{"state": {}, "param_groups": []}]}, plain)
    check_resume_algorithm(plain, "diloco")
