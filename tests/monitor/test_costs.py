"""What the swarm costs a peer: each round's estimated bytes, its averaging time, and the training thread's time
computing against its time blocked on the swarm, from the optimizers' reports to the peer's exporter, its signed DHT
record and the coordinator's swarm series.

The rounds here are stand-ins (``RoundResult`` lists, hook calls with chosen numbers, so every total is known
exactly); the DHT with vitpeer's record validators, the reporter, the exporters and ``promtool`` are real.
``test_prometheus.py`` sees the same series from two training peers, and ``tests/coordinator/test_api.py`` the
coordinator's ``/status``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import hivemind
import pytest
import torch
from builders import peer_report
from hivemind.compression import Float16Compression, NoCompression
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vitpeer.monitor.exporter import PeerExporter
from vitpeer.monitor.swarm import SwarmCollector
from vitpeer.peer.core.algorithms.diloco_optimizer import DiLoCoOptimizer
from vitpeer.peer.core.algorithms.diloco_rounds import RoundResult
from vitpeer.peer.core.averaging.events import SwarmEvents, SwarmTotals, allreduce_bytes_sent
from vitpeer.peer.core.averaging.hivemind_optimizer import SwarmOptimizer
from vitpeer.peer.core.averaging.quantization import BLOCK, Blockwise8BitCompression
from vitpeer.peer.core.swarm.records import (
    REPORT_TTL,
    PeerReport,
    aggregate,
    metrics_key,
    read_reports,
    record_validators,
    rejected_records,
)
from vitpeer.peer.core.swarm.reporter import SwarmReporter

RUN_ID = "costs-test"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(name, sorted labels) -> value of every sample in a Prometheus exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def promtool_accepts(promtool: Path, text: str) -> None:
    check = subprocess.run([str(promtool), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr


# --- the arithmetic -------------------------------------------------------------------------------------------------


def test_an_allreduce_sends_two_n_minus_one_over_n_of_the_tensors():
    assert [allreduce_bytes_sent(1000, n) for n in (0, 1, 2, 4, 10)] == [0, 0, 1000, 1500, 1800]


def test_a_gradient_rounds_bytes_follow_the_tensors_and_their_compression():
    params = [torch.zeros(1000), torch.zeros(24), torch.zeros(8, dtype=torch.bfloat16)]

    def wire_bytes(compression) -> float:  # the method reads only the gradient averager's tensors and compression
        averager = SimpleNamespace(parameters=params, allreduce_kwargs={"compression": compression})
        return SwarmOptimizer.gradient_wire_bytes(SimpleNamespace(grad_averager=averager))

    assert wire_bytes(NoCompression()) == 1024 * 4 + 8 * 2
    assert wire_bytes(Float16Compression()) == 1024 * 2 + 8 * 2  # bf16 stays 16 bits
    per_fp32 = (8 + 32 / BLOCK) / 8  # bytes per value: one int8, plus one fp32 scale per block
    assert wire_bytes(Blockwise8BitCompression()) == pytest.approx(1024 * per_fp32 + 8 * 2 * (8 + 32 / BLOCK) / 16)


def test_diloco_reports_each_round_once_with_its_bytes_and_only_new_waits():
    diloco = SimpleNamespace(rounds=[], wait_seconds=0.0, writes=0, epoch=0, refused_states=0)
    events = SwarmEvents()
    optimizer = DiLoCoOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), None, diloco, events)

    diloco.rounds += [RoundResult(0, "averaged", 2, 1.5, 1000), RoundResult(1, "failed", 0, 9.0, 0)]
    diloco.wait_seconds = 0.25
    optimizer._after_outer()
    optimizer._after_outer()  # nothing new since: nothing counted twice
    assert events.snapshot() == SwarmTotals(
        rounds=2, averaged_rounds=1, failed_rounds=1, sent_bytes=1000, averaging_seconds=1.5, wait_seconds=0.25
    )

    diloco.rounds += [RoundResult(2, "averaged", 3, 0.5, 1333), RoundResult(3, "alone", 1, 0.0, 0)]
    diloco.wait_seconds = 1.0
    optimizer._after_outer()
    # a failed round's time is not averaging time; waits are the new part of DiLoCo.wait_seconds only
    assert events.snapshot() == SwarmTotals(
        rounds=4, averaged_rounds=2, failed_rounds=1, sent_bytes=2333, averaging_seconds=2.0, wait_seconds=1.0
    )


def test_the_swarms_costs_are_sums_and_ratios_of_the_peers_records():
    def report(peer_id: str, **costs) -> PeerReport:
        return peer_report(peer_id=peer_id, algorithm="gradient", **costs)

    alice = report(
        "a", rounds=4, averaged_rounds=4, sent_bytes=4000, averaging_seconds=2.0, wait_seconds=2.0, compute_seconds=6.0
    )
    bob = report(
        "b",
        rounds=4,
        averaged_rounds=2,
        failed_rounds=1,
        sent_bytes=1000,
        averaging_seconds=4.0,
        wait_seconds=6.0,
        compute_seconds=2.0,
    )
    swarm = aggregate([alice, bob])
    assert swarm["algorithm"] == "gradient"
    assert swarm["communication"] == {
        "rounds": 8,
        "averaged_rounds": 6,
        "failed_rounds": 1,
        "sent_bytes": 5000,
        "averaging_seconds": 6.0,
        "wait_seconds": 8.0,
        "compute_seconds": 8.0,
        "sent_bytes_per_round": 5000 / 6,
        "averaging_seconds_per_round": 1.0,
        "compute_seconds_per_round": 1.0,
        "wait_ratio": 0.5,
    }
    a, b = swarm["peers"]
    assert (a["sent_bytes_per_round"], a["averaging_seconds_per_round"], a["wait_ratio"]) == (1000, 0.5, 0.25)
    assert (b["sent_bytes_per_round"], b["compute_seconds_per_round"], b["wait_ratio"]) == (500, 0.5, 0.75)
    nothing_yet = aggregate([report("c")])
    assert nothing_yet["communication"]["sent_bytes_per_round"] is None
    assert nothing_yet["communication"]["wait_ratio"] is None


# --- a peer's exporter and its record, the coordinator's series ------------------------------------------------------


@pytest.fixture
def dht():
    node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=record_validators(RUN_ID))
    try:
        yield node
    finally:
        node.shutdown()


def wait_for_reports(node: hivemind.DHT, count: int) -> list[PeerReport]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(found := read_reports(node, RUN_ID)) == count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{count} records not readable within 30 s: {read_reports(node, RUN_ID)}")


@pytest.mark.timeout(120)
def test_a_peer_exports_and_publishes_what_the_swarm_cost_it(dht, promtool: Path):
    exporter = PeerExporter()
    reporter = SwarmReporter(dht, RUN_ID)
    optimizer = SimpleNamespace(events=exporter, local_epoch=1, local_progress=SimpleNamespace(samples_per_second=8.0))
    swarm = SimpleNamespace(algorithm="diloco")
    strategy = SimpleNamespace(strategy_name="hivemind", swarm=swarm, optimizer=optimizer, peer_optimizer=None)
    trainer = SimpleNamespace(strategy=strategy, world_size=1)
    peer_id = dht.peer_id.to_base58()
    exporter.watch(peer_id, RUN_ID, strategy, reporter)
    reporter.on_train_start(trainer, None)

    exporter.state_download("loaded", 1.0)  # joining: a blocking download before the first step
    exporter.waited(1.0)
    batch = (torch.zeros(4, 3), torch.zeros(4))
    started = time.perf_counter()
    reporter.on_train_batch_start(trainer, None, batch, 0)
    time.sleep(0.3)  # the step computes, and inside it waits 0.25 s for the swarm
    exporter.waited(0.25)
    exporter.averaging_round("averaged", 1.5, 3000)  # rounds end in the background, in diloco
    exporter.averaging_round("averaged", 0.5, 1000)
    exporter.averaging_round("failed", None)
    exporter.averaging_round("alone", None)
    reporter.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, batch, 0)  # publishes the record
    step = time.perf_counter() - started

    compute = reporter.compute_seconds
    assert 0.3 - 0.25 <= compute <= step - 0.25  # the step's time less the wait inside it; the download is outside
    text = generate_latest(exporter.registry).decode()
    promtool_accepts(promtool, text)
    exported = samples(text)
    info = {"peer_id": peer_id, "run_id": RUN_ID, "strategy": "hivemind", "algorithm": "diloco"}
    assert [labels for (name, labels) in exported if name == "vitpeer_peer_info"] == [
        tuple(sorted({**info, "version": reporter.version}.items()))
    ]
    assert exported[("vitpeer_averaging_sent_bytes_total", ())] == 4000
    assert exported[("vitpeer_swarm_wait_seconds_total", ())] == 1.25
    assert exported[("vitpeer_compute_seconds_total", ())] == compute
    assert exported[("vitpeer_averaging_rounds_total", (("outcome", "averaged"),))] == 2
    assert exported[("vitpeer_averaging_round_duration_seconds_sum", ())] == 2.0

    # the same numbers in the peer's signed record, as the coordinator and `vitpeer monitor` read them
    (record,) = wait_for_reports(dht, 1)
    costs = {key: getattr(record, key) for key in ("algorithm", "rounds", "averaged_rounds", "failed_rounds")}
    assert costs == {"algorithm": "diloco", "rounds": 4, "averaged_rounds": 2, "failed_rounds": 1}
    assert (record.sent_bytes, record.averaging_seconds, record.wait_seconds) == (4000, 2.0, 1.25)
    assert record.compute_seconds == compute

    status = {**aggregate([record]), "rejected_records": {}}
    assert status["algorithm"] == "diloco"
    assert status["communication"]["sent_bytes_per_round"] == 2000
    assert status["communication"]["wait_ratio"] == pytest.approx(1.25 / (1.25 + compute))
    registry = CollectorRegistry()
    registry.register(SwarmCollector(lambda: status))
    text = generate_latest(registry).decode()
    promtool_accepts(promtool, text)
    swarm_series = samples(text)
    peer = (("peer_id", peer_id), ("signer", record.signer))
    assert swarm_series[("vitpeer_swarm_peer_sent_bytes_total", peer)] == 4000
    assert swarm_series[("vitpeer_swarm_peer_rounds_total", peer)] == 4
    assert swarm_series[("vitpeer_swarm_peer_averaged_rounds_total", peer)] == 2
    assert swarm_series[("vitpeer_swarm_peer_averaging_seconds_total", peer)] == 2.0
    assert swarm_series[("vitpeer_swarm_peer_wait_seconds_total", peer)] == 1.25
    assert swarm_series[("vitpeer_swarm_peer_compute_seconds_total", peer)] == compute
    labels = {"peer_id": peer_id, "signer": record.signer, "version": reporter.version, "hardware": reporter.hardware}
    labels["algorithm"] = "diloco"
    assert swarm_series[("vitpeer_swarm_peer_info", tuple(sorted(labels.items())))] == 1


@pytest.mark.timeout(120)
def test_a_record_without_the_costs_from_an_older_peer_is_refused_and_counted(dht):
    """A known limit, kept true here: the costs cannot be optional in the record. hivemind's schema check refuses a
    record that does not parse into exactly itself, and defaults make the parsed record larger."""
    older = {
        "peer_id": "older",
        "step": 2,
        "loss": 0.5,
        "window_samples": 8,
        "samples_per_second": 4.0,
        "samples": 16,
        "mini_steps": 2,
        "version": "0.0.9",
        "hardware": "cpu",
        "time": get_dht_time(),
    }
    assert PeerReport.parse_obj(older).dict() != older  # parsed, it has the costs' defaults
    subkey = RSASignatureValidator().local_public_key  # the node signs with this process's key
    key, expiration = metrics_key(RUN_ID), get_dht_time() + REPORT_TTL
    assert not dht.store(key, subkey=subkey, value=older, expiration_time=expiration)
    assert rejected_records(dht) == {"signature": 0, "schema": 1}
    assert read_reports(dht, RUN_ID) == []
