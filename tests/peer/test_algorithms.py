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
from vitpeer.peer.core.algorithms.diloco_rounds import ROUND_BOUND, round_bound
from vitpeer.peer.core.averaging.aggregation import AGGREGATIONS, centered_clip, mean, refusal, trimmed_mean
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


@pytest.mark.parametrize(
    "rule", [mean, centered_clip, first_sender], ids=["mean", "centered_clip", "coordinate-wise min"]
)
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


@pytest.mark.parametrize("rule", sorted(AGGREGATIONS))
def test_one_liar_of_three_or_four_moves_a_robust_rule_no_farther_than_the_honest_parts(rule: str):
    """Honest parts near 1; one liar sends -1000 everywhere and declares a weight of a million."""
    torch.manual_seed(0)
    for honest_count in (2, 3):
        honest = [1 + 0.1 * torch.randn(5000) for _ in range(honest_count)]
        reduced = AGGREGATIONS[rule]([*honest, torch.full((5000,), -1000.0)], [1.0] * honest_count + [1e6])
        distance = float((reduced - torch.stack(honest).mean(dim=0)).norm() / (5000**0.5))  # per coordinate
        if rule == "mean":
            assert distance > 900, distance  # hivemind's rule: the liar decides the round
        else:
            assert distance < 0.1, (honest_count, distance)  # the honest parts' own spread: 0.1 per coordinate


def test_a_clean_round_s_robust_result_is_close_to_the_mean():
    """The price of robustness when nobody lies: centered_clip stays within a tenth of the honest spread."""
    torch.manual_seed(0)
    parts = [torch.randn(5000) for _ in range(4)]
    plain = mean(parts, [1.0] * 4)
    assert float((centered_clip(parts, [1.0] * 4) - plain).norm() / plain.norm()) < 0.1
    assert float((trimmed_mean(parts, [1.0] * 4) - plain).norm() / plain.norm()) < 0.6


def test_what_a_peer_receives_is_checked_before_it_is_applied():
    own = [torch.ones(10), torch.ones(3)]
    assert refusal([2 * t for t in own], own, 8.0, apart=False) is None
    assert (
        refusal([100 * t for t in own], own, 8.0, apart=False) == "100 times as long as what this peer sent (at most 8)"
    )
    assert refusal([-0.5 * t for t in own], own, 8.0, apart=False) == "it points against this peer's own progress"
    nan = [own[0], torch.tensor([1.0, float("nan"), 1.0])]
    assert refusal(nan, own, 8.0, apart=False) == "non-finite values (NaN or Inf)"
    assert refusal([t + 0.1 for t in own], own, 0.5, apart=True) is None
    far = refusal([t + 1 for t in own], own, 0.5, apart=True)
    assert far == "1 times the length of what this peer sent, away from it (at most 0.5)"


def test_a_peer_that_trained_less_than_its_share_accepts_a_longer_round():
    """A CPU peer that made 256 of a 4096-sample step shared by 2 sees the GPU peer's progress as much longer than its
    own; a peer that trained its share or more keeps the plain bound."""
    assert round_bound(4096, 2, 2048) == round_bound(4096, 2, 4000) == ROUND_BOUND
    assert round_bound(4096, 2, 256) == 8 * ROUND_BOUND
    assert round_bound(4096, 1, 0) == 4096 * ROUND_BOUND  # no samples at all: bounded still
