"""A swarm that trusts no peer: states downloaded from peers are checked before anyone takes them, and non-finite
values stay out of the swarm in every algorithm. Real hivemind DHTs and averagers on 127.0.0.1.

The liar is a real averager in this process that announces its state with the highest priority, under the run's
prefix and the protocol name of the state it fakes, and serves a different poison at each download: NaN, another
shape, another dtype, a learning rate out of range, a swarm step of 10**6. An honest peer serves the true state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import hivemind
import pytest
import torch
from hivemind.compression import NoCompression
from processes import wait_for

from vitpeer.coordinator.state import open_swarm_state
from vitpeer.peer.core.algorithms.diloco_optimizer import DiLoCoOptimizer
from vitpeer.peer.core.algorithms.diloco_rounds import DiLoCo
from vitpeer.peer.core.algorithms.diloco_shared import OuterAverager
from vitpeer.peer.core.algorithms.observers import DiLoCoState
from vitpeer.peer.core.averaging.events import SwarmEvents
from vitpeer.peer.core.averaging.hivemind_optimizer import SwarmOptimizer
from vitpeer.peer.core.averaging.remote_state import StateRefused, optimizer_expectation
from vitpeer.peer.core.config import load_config
from vitpeer.peer.core.model import ImageClassifier, build_model

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
LIAR_PRIORITY = 1e9


class Recorder(SwarmEvents):
    def __init__(self):
        super().__init__()
        self.downloads: list[str] = []
        self.skipped: list[str] = []

    def state_download(self, outcome: str, seconds: float) -> None:
        super().state_download(outcome, seconds)
        self.downloads.append(outcome)

    def batch_skipped(self, reason: str) -> None:
        super().batch_skipped(reason)
        self.skipped.append(reason)


class TrainingStateAverager(hivemind.DecentralizedAverager):
    """A liar under the gradient state's protocol (hivemind names it after the class): the next of ``states`` at
    each download."""

    def __init__(self, states: list[tuple[dict, list[torch.Tensor]]], **kwargs):
        self.states = states
        super().__init__(**kwargs)

    def get_current_state(self):
        return self.states.pop(0)


@contextmanager
def swarm() -> Iterator[Callable[..., Any]]:
    """``start(thing)`` registers what the block starts; everything is shut down at the end, newest first."""
    bootstrap = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
    running: list[Any] = [bootstrap]

    def start(kind: str | Any = "dht"):
        if kind == "dht":
            maddrs = [str(maddr) for maddr in bootstrap.get_visible_maddrs()]
            kind = hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=maddrs)
        running.append(kind)
        return kind

    try:
        yield start
    finally:
        for thing in reversed(running):
            thing.shutdown()


def offered(dht: hivemind.DHT, prefix: str) -> dict[bytes, float]:
    found = dht.get(f"{prefix}.all_averagers", latest=True)
    return {key: entry.value for key, entry in found.value.items()} if found is not None else {}


def progress_seen(dht: hivemind.DHT, run_id: str, epoch: int) -> bool:
    found = dht.get(f"{run_id}_progress", latest=True)
    values = found.value.values() if found is not None else []
    return any(isinstance(entry.value, dict) and entry.value.get("epoch") == epoch for entry in values)


def poisons(metadata: dict, tensors: list[torch.Tensor], lr_at: int | None = None) -> list[tuple[dict, list]]:
    """The true state spoiled five ways (four without ``lr_at``, the optimizer entry of the learning rate)."""

    def spoiled(index: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor if i == index else t.clone() for i, t in enumerate(tensors)]

    nan = tensors[0].clone()
    nan.view(-1)[0] = float("nan")
    found = [
        (metadata, spoiled(0, nan)),
        (metadata, spoiled(0, torch.zeros(tensors[0].shape[0] + 1, *tensors[0].shape[1:]))),
        (metadata, spoiled(0, tensors[0].double())),
    ]
    if lr_at is not None:
        greedy = copy.deepcopy(metadata)
        greedy["optimizer_metadata"][lr_at]["value"] = 1e6
        found.append((greedy, [t.clone() for t in tensors]))
    found.append(({**metadata, "epoch": 10**6}, [t.clone() for t in tensors]))
    return found


def gradient_peer(dht: hivemind.DHT, run_id: str, events: SwarmEvents | None = None, **extra) -> SwarmOptimizer:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return SwarmOptimizer(
        events=events,
        max_steps=100,
        dht=dht,
        run_id=run_id,
        target_batch_size=10**6,
        params=model.parameters(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
        batch_size_per_step=4,
        matchmaking_time=1.0,
        averaging_timeout=5.0,
        load_state_timeout=20.0,
        client_mode=False,
        **extra,
    )


@pytest.mark.timeout(90)
def test_a_gradient_peer_refuses_each_poisoned_state_and_loads_the_honest_one():
    run_id = "remote-gradient"
    prefix = f"{run_id}_state_averager"
    with swarm() as start:
        honest = start(gradient_peer(start(), run_id))
        with torch.no_grad():
            for group in honest.state_averager.optimizer.param_groups:
                for param in group["params"]:
                    param.fill_(0.5)  # what the honest peer serves (its offloaded parameters)
        honest.state_averager.local_epoch = 3
        honest.tracker.report_local_progress(3, 1)  # hivemind reports a peer once it has samples
        honest.state_averager.state_sharing_priority = 3
        metadata, tensors, _ = honest.state_averager.get_current_state()
        expected = optimizer_expectation(honest.state_averager.optimizer)
        lr_at = next(index for index, (kind, _) in enumerate(expected) if kind == "lr")
        states = poisons(metadata, tensors, lr_at)
        liar = start(
            TrainingStateAverager(states, averaged_tensors=[torch.zeros(1)], dht=start(), prefix=prefix, start=True)
        )
        liar.state_sharing_priority = LIAR_PRIORITY
        wait_for("both offers", lambda: sorted(offered(honest.dht, prefix).values()) == [3.0, LIAR_PRIORITY], 30)
        wait_for("the honest peer's progress", lambda: progress_seen(honest.dht, run_id, 3), 30)

        events = Recorder()
        joiner = start(gradient_peer(start(), run_id, events))
        poisoned = len(states)
        for download in range(poisoned):
            joiner.load_state_from_peers()
            assert events.downloads[-2:] == ["refused", "loaded" if download == 0 else "current"], events.downloads
            assert joiner.local_epoch == 3 and joiner.state_averager.scheduler.last_epoch == 3
            _, loaded, _ = joiner.state_averager.get_current_state()
            for index, (ours, theirs) in enumerate(zip(loaded, tensors, strict=True)):
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=f"tensor {index}")
            assert joiner.opt.param_groups[0]["lr"] == pytest.approx(0.01)
        assert not states, "the liar was asked once per download"
        assert joiner.state_averager.refused_states == poisoned
        assert events.downloads.count("refused") == poisoned


def diloco_peer(dht: hivemind.DHT, run_id: str, max_steps: int = 100, **options) -> DiLoCo:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    settings: dict[str, Any] = dict(
        target_batch_size=64,
        outer_lr=0.7,
        outer_momentum=0.9,
        compression=NoCompression(),
        matchmaking_time=1.0,
        averaging_timeout=5.0,
        load_state_timeout=20.0,
        progress_expiration=30.0,
        sync_every=100,
    )
    return DiLoCo(list(model.parameters()), dht=dht, run_id=run_id, max_steps=max_steps, **{**settings, **options})


@pytest.mark.timeout(90)
def test_a_diloco_peer_refuses_each_poisoned_state_and_loads_the_honest_one():
    run_id = "remote-diloco"
    prefix = f"{run_id}_diloco"
    with swarm() as start:
        honest = start(diloco_peer(start(), run_id))
        torch.manual_seed(1)
        truth = [torch.randn_like(shared) for shared in honest.shared * 2]
        honest.restore(5, truth)  # offers its state at priority 5
        honest.tracker.report_local_progress(5, 1)  # a training peer's record (hivemind reports one with samples)
        states = poisons({"epoch": 5}, truth)
        liar = start(
            OuterAverager(
                lambda: states.pop(0), averaged_tensors=[torch.zeros(1)], dht=start(), prefix=prefix, start=True
            )
        )
        liar.state_sharing_priority, liar.allow_state_sharing = LIAR_PRIORITY, True
        wait_for("both offers", lambda: sorted(offered(honest.dht, prefix).values()) == [5.0, LIAR_PRIORITY], 30)
        wait_for("the honest peer's progress", lambda: progress_seen(honest.dht, run_id, 5), 30)

        joiner = diloco_peer(start(), run_id)
        inner = torch.optim.SGD(joiner.params, lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: 1.0)
        events = Recorder()
        optimizer = start(DiLoCoOptimizer(inner, schedule, joiner, events))
        poisoned = len(states)
        for download in range(poisoned):
            optimizer.load_state_from_peers()
            assert events.downloads[-2:] == ["loaded" if download == 0 else "current", "refused"], events.downloads
            assert joiner.epoch == 5 and schedule.last_epoch == 5
            for index, (ours, theirs) in enumerate(zip(joiner.outer_state()[1], truth, strict=True)):
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=f"tensor {index}")
        assert not states and joiner.refused_states == poisoned


@pytest.mark.timeout(120)
def test_the_coordinator_refuses_poisoned_states_and_checkpoints_the_honest_one():
    config = load_config("digits_tiny_diloco", {"swarm.run_id": "remote-coordinator"})
    prefix = f"{config.swarm.run_id}_diloco"
    with swarm() as start:
        net = build_model(config.model, 10)
        groups = ImageClassifier(net, 10, config.optim, config.trainer.max_steps).configure_optimizers()["optimizer"]
        honest = start(
            DiLoCo(
                [param for group in groups.param_groups for param in group["params"]],  # as the strategy takes them
                dht=start(),
                run_id=config.swarm.run_id,
                target_batch_size=config.swarm.target_batch_size,
                outer_lr=0.7,
                outer_momentum=0.9,
                compression=NoCompression(),
                matchmaking_time=1.0,
                averaging_timeout=5.0,
                load_state_timeout=20.0,
                progress_expiration=30.0,
                sync_every=100,
            )
        )
        torch.manual_seed(1)
        truth = [torch.randn_like(shared) for shared in honest.shared * 2]
        honest.restore(7, truth)
        honest.tracker.report_local_progress(7, 1)
        states = poisons({"epoch": 7}, truth)[::3]  # NaN, then swarm step 10**6
        liar = start(
            OuterAverager(
                lambda: states.pop(0), averaged_tensors=[torch.zeros(1)], dht=start(), prefix=prefix, start=True
            )
        )
        liar.state_sharing_priority, liar.allow_state_sharing = LIAR_PRIORITY, True
        wait_for("both offers", lambda: sorted(offered(honest.dht, prefix).values()) == [7.0, LIAR_PRIORITY], 30)
        wait_for("the honest peer's progress", lambda: progress_seen(honest.dht, config.swarm.run_id, 7), 30)

        coordinator = start(open_swarm_state(config, start()))
        assert isinstance(coordinator, DiLoCoState)
        assert coordinator.download(timeout=30) and coordinator.epoch == 7
        assert coordinator.refused_states == 1
        assert not coordinator.download(timeout=30), "the honest state again is nothing newer"
        assert coordinator.refused_states == 2 and coordinator.epoch == 7 and not states
        count = len(honest.shared)
        for ours, theirs in zip([*coordinator.params, *coordinator.momentum], truth, strict=True):
            torch.testing.assert_close(ours.detach(), theirs, rtol=0, atol=0)
        checkpoint = coordinator.state_dict()  # what it writes: the honest state
        checkpoint["outer_momentum"] = [m.clone() for m in checkpoint["outer_momentum"]]
        checkpoint["outer_momentum"][0].view(-1)[0] = float("inf")
        with pytest.raises(StateRefused, match="NaN or Inf"):
            coordinator.load_state_dict(checkpoint)
        assert coordinator.epoch == 7 and torch.equal(coordinator.momentum[0], truth[count])


@pytest.mark.timeout(60)
def test_with_local_updates_a_batch_with_nan_gradients_is_not_stepped():
    with swarm() as start:
        events = Recorder()
        opt = start(gradient_peer(start(), "remote-local-updates", events, use_local_updates=True))
        params = opt.state_averager.main_parameters
        before = [param.detach().clone() for param in params]

        def closure(value: float):
            def run():
                opt.zero_grad()
                loss = (params[0].sum() + params[1].sum()) * value
                loss.backward()
                return loss

            return run

        opt.step(closure(float("nan")), batch_size=4)
        assert opt.skipped_batches == 1 and events.skipped == ["nonfinite"]
        for param, old in zip(params, before, strict=True):
            assert torch.equal(param.detach(), old), "a NaN batch moved the parameters"
        assert opt.tracker.local_progress.samples_accumulated == 0, "its samples were counted"
        opt.step(closure(1.0), batch_size=4)
        assert all(not torch.equal(param.detach(), old) for param, old in zip(params, before, strict=True))
        assert all(torch.isfinite(param).all() for param in params) and opt.skipped_batches == 1


@pytest.mark.timeout(90)
def test_a_batch_finished_behind_the_swarm_is_dropped_unsent_and_counted():
    """hivemind checks whether a peer fell behind before the poison guard sees the batch: such a batch (NaN here) is
    dropped with the state download, never sent, and counted as ``behind`` so the samples lost are visible."""
    run_id = "remote-behind"
    with swarm() as start:
        ahead = start(gradient_peer(start(), run_id))
        ahead.state_averager.local_epoch = 5
        ahead.tracker.report_local_progress(5, 1)
        ahead.state_averager.state_sharing_priority = 5
        events = Recorder()
        behind = start(gradient_peer(start(), run_id, events))
        wait_for("the swarm's step 5 seen", lambda: behind.tracker.global_epoch == 5, 30)
        params = behind.state_averager.main_parameters

        def nan_loss():
            behind.zero_grad()
            loss = params[0].sum() * float("nan")
            loss.backward()
            return loss

        behind.step(nan_loss, batch_size=4)
        assert events.skipped == ["behind"] and behind.dropped_behind == 1 and behind.skipped_batches == 0
        assert behind.local_epoch == 5 and events.downloads == ["loaded"], events.downloads
        assert behind.tracker.local_progress.samples_accumulated == 0, "its samples were counted"
        assert all(torch.isfinite(param).all() for param in params)


@pytest.mark.timeout(60)
def test_diloco_keeps_nonfinite_gradients_steps_and_progress_out_of_the_swarm():
    with swarm() as start:
        diloco = diloco_peer(start(), "remote-diloco-poison")
        inner = torch.optim.SGD(diloco.params, lr=0.1)
        events = Recorder()
        optimizer = start(DiLoCoOptimizer(inner, None, diloco, events))
        shared = [s.clone() for s in diloco.shared]

        def with_grads(value: float) -> None:
            for param in diloco.params:
                param.grad = torch.full_like(param, value)
            optimizer.step(batch_size=4)

        def at_shared() -> bool:
            return all(torch.equal(p.detach(), s) for p, s in zip(diloco.params, shared, strict=True))

        with_grads(float("nan"))  # NaN gradients: not stepped
        assert at_shared() and events.skipped == ["nonfinite"]
        with_grads(1.0)  # a good step moves the parameters
        assert not at_shared() and optimizer.skipped_batches == 1
        inner.param_groups[0]["lr"] = 1e38  # finite gradients, but the step overflows to -Inf: undone, back to where
        with_grads(10.0)  # the round began
        inner.param_groups[0]["lr"] = 0.1
        assert at_shared() and events.skipped == ["nonfinite", "nonfinite"]
        with_grads(1.0)
        assert all(torch.isfinite(param).all() for param in diloco.params)

        with torch.no_grad():  # NaN parameters at the hand-off (the guards above bypassed): the round is not sent
            diloco.params[0].view(-1)[0] = float("nan")
        diloco.after_local_step(64)
        assert diloco.skipped_rounds == 1 and diloco.epoch == 1
        assert all(torch.equal(s, old) for s, old in zip(diloco.shared, shared, strict=True))
        assert at_shared() and not diloco.rounds
