"""The seams of training together: the algorithm registry (``config.swarm.ALGORITHMS``) and the aggregation rule
that every averager reduces its rounds with (``core.averaging.aggregation``), each exercised for real."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hivemind
import pytest
import torch
from fits import fit

from vitpeer.peer.core.algorithms.base import PeerOptimizer, PeerSetup
from vitpeer.peer.core.algorithms.diloco import DiLoCoAlgorithm
from vitpeer.peer.core.averaging.aggregation import mean
from vitpeer.peer.core.averaging.hivemind_averagers import GroupSizedAverager
from vitpeer.peer.core.config import ALGORITHMS, ConfigError, load_config
from vitpeer.peer.core.lightning.strategy import HivemindStrategy
from vitpeer.peer.core.swarm.dht import start_dht

pytestmark = pytest.mark.timeout(240)


class LocalSGD(DiLoCoAlgorithm):
    """A third algorithm: local SGD, each peer trains alone for a round and the peers average their parameters
    (diloco whose outer step is a plain average: outer lr 1, no momentum)."""

    name = "local_sgd"

    def make_optimizer(self, peer: PeerSetup, inner, scheduler) -> PeerOptimizer:
        plain = peer.swarm.model_copy(update={"outer_lr": 1.0, "outer_momentum": 0.0})
        return super().make_optimizer(dataclasses.replace(peer, swarm=plain), inner, scheduler)


ALGORITHM = LocalSGD()


def test_a_third_algorithm_is_one_module_and_one_registry_line(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(ALGORITHMS, "local_sgd", __name__)  # the registry line: this module is the new algorithm
    config = load_config(
        "digits_tiny",
        {
            "swarm.algorithm": "local_sgd",
            "swarm.host_maddrs": ["/ip4/127.0.0.1/tcp/0"],
            "swarm.run_id": f"local-sgd-{tmp_path.name}",
            "swarm.target_batch_size": 64,
            "trainer.max_steps": 3,
        },
    )
    assert config.swarm.wire_compression == "fp16"  # what it inherits from diloco
    dht = start_dht(config.swarm)
    try:
        strategy = HivemindStrategy(config.swarm, dht)
        trainer = fit(config, strategy, 3, tmp_path)
        optimizer = strategy.optimizer
        assert optimizer.local_epoch == 3 and trainer.global_step == 3
        outer = optimizer.diloco.outer.param_groups[0]  # type: ignore[attr-defined]  # built by LocalSGD
        assert outer["lr"] == 1.0 and outer["momentum"] == 0.0
        # each swarm step (64 samples at batch 32) was two inner steps, then the plain average of one peer
        assert [result.outcome for result in optimizer.diloco.rounds] == ["alone"] * 3  # type: ignore[attr-defined]
    finally:
        dht.shutdown()


def test_an_unknown_algorithm_is_refused_naming_the_registered_ones():
    with pytest.raises(ConfigError) as refused:
        load_config("digits_tiny", {"swarm.algorithm": "fedprox"})
    assert "unknown swarm.algorithm 'fedprox'; expected one of diloco, gradient" in str(refused.value)


def first_sender(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """A rule no plain mean could produce: the reduced part is the smallest value of each coordinate."""
    return torch.stack(list(parts)).amin(dim=0)


@pytest.mark.parametrize("rule", [mean, first_sender], ids=["mean", "coordinate-wise min"])
def test_every_averager_reduces_its_rounds_with_the_run_s_aggregation_rule(rule):
    """Three real averagers on 127.0.0.1 average a 3-part tensor: each receives what the rule makes of the three
    peers' values (hivemind's own reducer would hand each the weighted mean)."""
    values = [torch.full((3000,), value) for value in (1.0, 2.0, 30.0)]
    weights = [1.0, 1.0, 2.0]
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first] + [
        hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
        for _ in range(2)
    ]
    averagers = [
        GroupSizedAverager(
            averaged_tensors=[value.clone()],
            dht=dht,
            prefix="aggregation-test",
            target_group_size=3,
            min_matchmaking_time=2.0,
            request_timeout=1.0,
            part_size_bytes=4000,  # 3 parts of 1000 values: each peer reduces one
            aggregation=rule,
            start=True,
        )
        for value, dht in zip(values, dhts, strict=True)
    ]
    try:
        with ThreadPoolExecutor(3) as pool:
            steps = [pool.submit(a.step, weight=w, timeout=30) for a, w in zip(averagers, weights, strict=True)]
            groups = [step.result() for step in steps]
        assert all(group is not None and len(group) == 3 for group in groups), groups
        expected = rule(values, weights)
        for averager in averagers:
            with averager.get_tensors() as (received,):
                torch.testing.assert_close(received, expected, rtol=0, atol=1e-6)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()
