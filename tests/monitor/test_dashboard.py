"""The Grafana dashboard ``monitor/grafana/dashboards/vitpeer.json`` and ``monitor/prometheus.yml``.

Grafana is not installed here, so the dashboard is checked in three layers:

1. structure: what file provisioning needs (no ``__inputs``, datasource through the ``$datasource`` variable, unique
   ids, units, template variables);
2. PromQL: every panel expression, with Grafana's variables substituted, becomes a recording rule
   ``dashboard:<panel id>_<refId>`` that ``promtool check rules`` must accept;
3. meaning: ``promtool test rules`` evaluates those rules on recorded series of two peers, their GPUs and the
   coordinator, and compares every result with the labels and value worked out by hand next to ``EXPECTED``.

``METRICS`` is the contract with the exporters (``monitor/``, ``peer/``, ``coordinator/``): a panel may query only
these names.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "monitor" / "grafana" / "dashboards" / "vitpeer.json"
PROMETHEUS_CONFIG = REPO / "monitor" / "prometheus.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TIMEOUT = 60

# Every sample name the exporters expose (histograms as their _bucket/_sum/_count series).
METRICS = frozenset(
    {
        # peer exporter (`vitpeer join --metrics-port`), job vitpeer-peer; vitpeer_peer_info also on the coordinator
        "vitpeer_peer_info",
        "vitpeer_samples_total",
        "vitpeer_local_steps_total",
        "vitpeer_samples_per_second",
        "vitpeer_loss",
        "vitpeer_swarm_epoch",
        "vitpeer_swarm_peers",
        "vitpeer_swarm_samples_accumulated",
        "vitpeer_target_batch_size",
        "vitpeer_averaging_rounds_total",
        "vitpeer_averaging_round_duration_seconds_bucket",
        "vitpeer_averaging_round_duration_seconds_sum",
        "vitpeer_averaging_round_duration_seconds_count",
        "vitpeer_averaging_sent_bytes_total",
        "vitpeer_swarm_wait_seconds_total",
        "vitpeer_compute_seconds_total",
        "vitpeer_state_downloads_total",
        # host series, peers and coordinator
        "vitpeer_gpus",
        "vitpeer_gpu_info",
        "vitpeer_gpu_utilization_ratio",
        "vitpeer_gpu_memory_used_bytes",
        "vitpeer_gpu_memory_total_bytes",
        "vitpeer_gpu_power_watts",
        "vitpeer_gpu_temperature_celsius",
        "vitpeer_process_cpu_utilization_ratio",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        # swarm series: the coordinator's HTTP port (job vitpeer-coordinator) and `vitpeer monitor`
        "vitpeer_swarm_alive_peers",
        "vitpeer_swarm_samples_per_second",
        "vitpeer_swarm_loss",
        "vitpeer_swarm_peer_info",
        "vitpeer_swarm_peer_epoch",
        "vitpeer_swarm_peer_samples_per_second",
        "vitpeer_swarm_peer_loss",
        "vitpeer_swarm_peer_samples_total",
        "vitpeer_swarm_peer_report_age_seconds",
        "vitpeer_swarm_peer_rounds_total",
        "vitpeer_swarm_peer_averaged_rounds_total",
        "vitpeer_swarm_peer_sent_bytes_total",
        "vitpeer_swarm_peer_averaging_seconds_total",
        "vitpeer_swarm_peer_wait_seconds_total",
        "vitpeer_swarm_peer_compute_seconds_total",
        "vitpeer_rejected_records_total",
        # coordinator only
        "vitpeer_checkpoint_epoch",
        "vitpeer_checkpoint_timestamp_seconds",
        "vitpeer_checkpoint_val_accuracy_ratio",
        "vitpeer_checkpoint_failures_total",
    }
)

# Grafana's variables as promtool sees them: every peer and GPU, and fixed windows.
SUBSTITUTIONS = {"peer": ".*", "gpu": ".*", "__rate_interval": "1m", "__interval": "1m", "__range": "5m"}
VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in all_panels(dashboard["panels"]) if panel["type"] != "row"]


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in SUBSTITUTIONS:
            raise AssertionError(f"expression uses ${name}, which neither the dashboard nor this test defines: {expr}")
        return SUBSTITUTIONS[name]

    return VARIABLE.sub(value, expr)


def recording_rules() -> list[dict[str, str]]:
    """One rule ``dashboard:<panel id>_<refId>`` per panel expression, Grafana's variables substituted."""
    return [
        {"record": f"dashboard:{panel['id']}_{target['refId']}", "expr": substitute(target["expr"])}
        for panel in data_panels(load_dashboard())
        for target in panel.get("targets", [])
    ]


def write_rules(directory: Path) -> Path:
    path = directory / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording_rules()}]}, sort_keys=False))
    return path


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_LABEL_LISTS = re.compile(
    r"\{[^}]*\}"  # label matchers
    r"|\[[^\]]*\]"  # range and subquery windows
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"  # label lists
)
_NOT_NAMES = re.compile(
    r"\b[a-zA-Z_]\w*\s*(?=\()"  # function and aggregation names, once `by (...)` is gone
    r"|\b(?:and|or|unless|bool|offset)\b"
    r"|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b"  # numbers
)
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a tokenizer good enough for the dashboard's expressions)."""
    expr = _LABEL_LISTS.sub(" ", _STRINGS.sub('""', expr))
    return set(_NAME.findall(_NOT_NAMES.sub(" ", expr)))


# --- structure ------------------------------------------------------------------------------------------------------


def test_dashboard_is_provisionable() -> None:
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    assert "__inputs" not in dashboard, "exported 'for sharing': file provisioning cannot resolve __inputs"
    assert "DS_" not in text, "a ${DS_...} input reference is left; use the $datasource variable"
    assert dashboard["uid"] == "vitpeer-swarm"
    assert dashboard["title"] == "vitpeer swarm"
    assert dashboard["schemaVersion"] >= 36


def test_panel_ids_unique_and_placed() -> None:
    panels = list(all_panels(load_dashboard()["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys(), panel["title"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the dashboard"


def test_every_panel_and_target_uses_the_datasource_variable() -> None:
    panels = data_panels(load_dashboard())
    assert panels
    for panel in panels:
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        assert panel.get("targets"), f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, f"{panel['title']} {target.get('refId')}"


def test_every_panel_has_a_unit() -> None:
    for panel in data_panels(load_dashboard()):
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"


def test_targets_have_an_expression_and_unique_ref_ids() -> None:
    for panel in data_panels(load_dashboard()):
        ref_ids = [target.get("refId") for target in panel["targets"]]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), f"{panel['title']}: refIds {ref_ids}"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{panel['title']} {target['refId']} has no expr"


def test_template_variables() -> None:
    variables = {variable["name"]: variable for variable in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, query in (
        ("peer", "label_values(vitpeer_peer_info, peer_id)"),
        ("gpu", "label_values(vitpeer_gpu_info, gpu)"),
    ):
        variable = variables[name]
        found = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        assert (variable["type"], found) == ("query", query)
        assert variable["datasource"] == DATASOURCE
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"


def test_per_peer_and_gpu_panels_honour_the_filters() -> None:
    """The variables filter something: every per-peer expression matches $peer, every GPU expression $gpu too."""
    for panel in data_panels(load_dashboard()):
        for target in panel["targets"]:
            expr = target["expr"]
            if "peer_id" in expr:
                assert 'peer_id=~"$peer"' in expr, f"{panel['title']}: {expr}"
            if "vitpeer_gpu_" in expr:
                assert 'gpu=~"$gpu"' in expr, f"{panel['title']}: {expr}"


# --- PromQL ---------------------------------------------------------------------------------------------------------


def test_metric_names_tokenizer() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (peer_id, le) (rate(vitpeer_averaging_round_duration_seconds_bucket[1m]) "
        '* on(instance) group_left(peer_id) vitpeer_peer_info{peer_id=~"a|b", x="rate(y)"})) * 60 - time()'
    )
    assert metric_names(expr) == {"vitpeer_averaging_round_duration_seconds_bucket", "vitpeer_peer_info"}
    assert metric_names("rate(vitpeer_bogus_total[5m])") - METRICS == {"vitpeer_bogus_total"}


def test_dashboard_queries_only_contract_metrics() -> None:
    for rule in recording_rules():
        unknown = metric_names(rule["expr"]) - METRICS
        assert not unknown, f"{rule['record']} queries {sorted(unknown)}, which no exporter exports: {rule['expr']}"


def test_promtool_accepts_every_expression(promtool: Path, tmp_path: Path) -> None:
    rules = write_rules(tmp_path)
    result = subprocess.run(
        [str(promtool), "check", "rules", str(rules)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_prometheus_config(promtool: Path) -> None:
    result = subprocess.run(
        [str(promtool), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- meaning: promtool test rules on recorded series ----------------------------------------------------------------
# Input series every 20 s, evaluated at 10m. Prometheus 2.x windows include both ends, so rate(x[1m]) at 10m sees
# four samples 20 s apart: a counter rising by N per sample has rate N/20 per second. increase(x[5m]) covers 5m..10m.

ALICE, BOB, COORDINATOR = "12D3KooWAlice", "12D3KooWBob", "12D3KooWCoordinator"
PEER_1 = {"instance": "peer-1:9470", "job": "vitpeer-peer"}
PEER_2 = {"instance": "peer-2:9470", "job": "vitpeer-peer"}
COORD = {"instance": "coordinator:8470", "job": "vitpeer-coordinator"}
GIB, MIB = 2**30, 2**20
ALICE_INFO = {"peer_id": ALICE, "version": "0.1.0", "hardware": "2x RTX 4090", "algorithm": "diloco"}
BOB_INFO = {"peer_id": BOB, "version": "0.1.0", "hardware": "Tesla T4", "algorithm": "diloco"}
RTX, T4 = {"name": "NVIDIA GeForce RTX 4090", "driver": "550.54.14"}, {"name": "Tesla T4", "driver": "535.104.05"}
GPUS = (  # (target labels, gpu, uuid, utilization, used, total, watts, celsius)
    (PEER_1, "0", "GPU-a0", 0.75, 8 * GIB, 24 * GIB, 250, 70),
    (PEER_1, "1", "GPU-a1", 0.5, 4 * GIB, 24 * GIB, 200, 65),
    (PEER_2, "0", "GPU-b0", 0.25, 2 * GIB, 16 * GIB, 50, 55),
)


def series(name: str, labels: dict[str, str], values: str | float) -> dict[str, str]:
    inner = ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values if isinstance(values, str) else f"{values}x60"}


def input_series() -> list[dict[str, str]]:
    peers = (
        (PEER_1, ALICE, "hivemind"),
        (PEER_2, BOB, "hivemind"),
        (COORD, COORDINATOR, "coordinator"),
    )
    run = {"run_id": "vitpeer-digits", "version": "0.1.0", "algorithm": "diloco"}
    out = [series("vitpeer_peer_info", {**t, **run, "peer_id": p, "strategy": s}, 1) for t, p, s in peers]
    out += [
        series("vitpeer_samples_total", PEER_1, "0+1280x60"),  # 64/s
        series("vitpeer_samples_total", PEER_2, "0+640x60"),  # 32/s
        series("vitpeer_local_steps_total", PEER_1, "0+40x60"),  # 2/s
        series("vitpeer_local_steps_total", PEER_2, "0+20x60"),  # 1/s
        series("vitpeer_samples_per_second", PEER_1, 64),
        series("vitpeer_samples_per_second", PEER_2, 32),
        series("vitpeer_loss", PEER_1, 0.5),
        series("vitpeer_loss", PEER_2, 0.75),
        series("vitpeer_swarm_epoch", PEER_1, 42),
        series("vitpeer_swarm_epoch", PEER_2, 41),
        series("vitpeer_swarm_epoch", COORD, 42),
        series("vitpeer_swarm_peers", PEER_1, 2),
        series("vitpeer_swarm_peers", PEER_2, 2),
        series("vitpeer_swarm_samples_accumulated", PEER_1, 64),
        series("vitpeer_swarm_samples_accumulated", PEER_2, 96),
        series("vitpeer_target_batch_size", PEER_1, 128),
        series("vitpeer_target_batch_size", PEER_2, 128),
        series("vitpeer_averaging_rounds_total", {**PEER_1, "outcome": "averaged"}, "0+10x60"),  # 30/min
        series("vitpeer_averaging_rounds_total", {**PEER_1, "outcome": "failed"}, "0+5x60"),  # 15/min
        series("vitpeer_averaging_rounds_total", {**PEER_1, "outcome": "alone"}, 0),
        series("vitpeer_averaging_rounds_total", {**PEER_2, "outcome": "averaged"}, "0+5x60"),  # 15/min
        series("vitpeer_averaging_rounds_total", {**PEER_2, "outcome": "failed"}, 0),
        series("vitpeer_averaging_rounds_total", {**PEER_2, "outcome": "alone"}, "0+5x60"),  # 15/min
        # what the swarm costs each peer, as its own exporter counts it: per 20 s sample
        series("vitpeer_averaging_sent_bytes_total", PEER_1, f"0+{20 * MIB}x60"),  # 1 MiB/s over 0.5 rounds/s
        series("vitpeer_averaging_sent_bytes_total", PEER_2, f"0+{5 * MIB}x60"),  # 0.25 MiB/s over 0.25 rounds/s
        series("vitpeer_swarm_wait_seconds_total", PEER_1, "0+20x60"),  # 1 s/s
        series("vitpeer_swarm_wait_seconds_total", PEER_2, "0+40x60"),  # 2 s/s
        series("vitpeer_compute_seconds_total", PEER_1, "0+60x60"),  # 3 s/s: blocked 1 / (1 + 3)
        series("vitpeer_compute_seconds_total", PEER_2, "0+40x60"),  # 2 s/s: blocked 2 / (2 + 2)
        series("vitpeer_state_downloads_total", {**PEER_1, "outcome": "loaded"}, 1),  # before the 5m range
        series("vitpeer_state_downloads_total", {**PEER_1, "outcome": "failed"}, 0),
        series("vitpeer_state_downloads_total", {**PEER_2, "outcome": "loaded"}, "0x20 1x40"),  # one at 7m
        series("vitpeer_state_downloads_total", {**PEER_2, "outcome": "failed"}, 0),
    ]
    # Round durations, bucket increments per sample. peer-1: 5 in (0.5, 1], 10 in (1, 2], 3 in (2, 5], 2 above:
    # p50 = 1 + (10 - 5) / (15 - 5) * 1 = 1.5; p90: 0.9 * 20 = 18 is le=5's count, so p90 = 5.
    # peer-2: 5 in (0, 0.5], 5 in (0.5, 1], 10 in (1, 2]: p50 = 0.5 + (10 - 5) / 5 * 0.5 = 1, p90 = 1 + 8 / 10 = 1.8.
    for target, counts in ((PEER_1, (0, 5, 15, 18, 20)), (PEER_2, (5, 10, 20, 20, 20))):
        for le, count in zip(("0.5", "1", "2", "5", "+Inf"), counts, strict=True):
            name = "vitpeer_averaging_round_duration_seconds_bucket"
            out.append(series(name, {**target, "le": le}, f"0+{count}x60"))
        out.append(series("vitpeer_averaging_round_duration_seconds_count", target, f"0+{counts[-1]}x60"))
    out += [series("vitpeer_gpus", t, n) for t, n in ((PEER_1, 2), (PEER_2, 1), (COORD, 0))]
    for target, gpu, uuid, utilization, used, total, watts, celsius in GPUS:
        labels = {**target, "gpu": gpu, "uuid": uuid}
        out += [
            series("vitpeer_gpu_info", {**labels, **(RTX if target is PEER_1 else T4)}, 1),
            series("vitpeer_gpu_utilization_ratio", labels, utilization),
            series("vitpeer_gpu_memory_used_bytes", labels, used),
            series("vitpeer_gpu_memory_total_bytes", labels, total),
            series("vitpeer_gpu_power_watts", labels, watts),
            series("vitpeer_gpu_temperature_celsius", labels, celsius),
        ]
    for target, ratio, cpu_seconds, rss in (
        (PEER_1, 0.5, 20, 2 * GIB),
        (PEER_2, 0.25, 40, GIB),
        (COORD, 0.125, 10, GIB // 2),
    ):
        out += [
            series("vitpeer_process_cpu_utilization_ratio", target, ratio),
            series("process_cpu_seconds_total", target, f"0+{cpu_seconds}x60"),  # cpu_seconds / 20 cores
            series("process_resident_memory_bytes", target, rss),
        ]
    # The coordinator's swarm view and checkpoints.
    out += [
        series("vitpeer_swarm_alive_peers", COORD, 2),
        series("vitpeer_swarm_samples_per_second", COORD, 96),
        series("vitpeer_swarm_loss", COORD, 0.625),
        series("vitpeer_swarm_peer_info", {**COORD, **ALICE_INFO}, 1),
        series("vitpeer_swarm_peer_info", {**COORD, **BOB_INFO}, 1),
        series("vitpeer_swarm_peer_epoch", {**COORD, "peer_id": ALICE}, 42),
        series("vitpeer_swarm_peer_epoch", {**COORD, "peer_id": BOB}, 41),
        series("vitpeer_swarm_peer_samples_per_second", {**COORD, "peer_id": ALICE}, 64),
        series("vitpeer_swarm_peer_samples_per_second", {**COORD, "peer_id": BOB}, 32),
        series("vitpeer_swarm_peer_loss", {**COORD, "peer_id": ALICE}, 0.5),
        series("vitpeer_swarm_peer_loss", {**COORD, "peer_id": BOB}, 0.75),
        series("vitpeer_swarm_peer_samples_total", {**COORD, "peer_id": ALICE}, "0+1280x60"),  # 30 * 1280 at 10m
        series("vitpeer_swarm_peer_samples_total", {**COORD, "peer_id": BOB}, "0+640x60"),
        series("vitpeer_swarm_peer_report_age_seconds", {**COORD, "peer_id": ALICE}, 2),
        series("vitpeer_swarm_peer_report_age_seconds", {**COORD, "peer_id": BOB}, 4.5),
        # the costs in the peers' records, per 20 s sample. Alice: 0.25 rounds/s, all averaged, 1 MiB/s sent (4 MiB
        # a round), 0.5 s/s averaging (2 s a round), 3 s/s computing (12 s a round), 1 s/s blocked (1 / (1 + 3)).
        # Bob: 0.5 rounds/s, 0.25 averaged, 0.5 MiB/s (2 MiB a round), 0.25 s/s averaging (1 s a round), 2 s/s
        # computing (4 s a round), 2 s/s blocked (2 / (2 + 2)).
        *(
            series(f"vitpeer_swarm_peer_{name}_total", {**COORD, "peer_id": peer}, f"0+{per_sample}x60")
            for peer, per_sample_by_name in (
                (ALICE, {"rounds": 5, "averaged_rounds": 5, "sent_bytes": 20 * MIB, "averaging_seconds": 10}),
                (BOB, {"rounds": 10, "averaged_rounds": 5, "sent_bytes": 10 * MIB, "averaging_seconds": 5}),
            )
            for name, per_sample in per_sample_by_name.items()
        ),
        series("vitpeer_swarm_peer_compute_seconds_total", {**COORD, "peer_id": ALICE}, "0+60x60"),
        series("vitpeer_swarm_peer_wait_seconds_total", {**COORD, "peer_id": ALICE}, "0+20x60"),
        series("vitpeer_swarm_peer_compute_seconds_total", {**COORD, "peer_id": BOB}, "0+40x60"),
        series("vitpeer_swarm_peer_wait_seconds_total", {**COORD, "peer_id": BOB}, "0+40x60"),
        series("vitpeer_rejected_records_total", {**COORD, "reason": "signature"}, "0+1x60"),  # 15 in 5m..10m
        series("vitpeer_rejected_records_total", {**COORD, "reason": "schema"}, 0),
        series("vitpeer_checkpoint_epoch", COORD, 40),
        series("vitpeer_checkpoint_timestamp_seconds", COORD, 540),  # written at 9m: 60 s old at 10m
        series("vitpeer_checkpoint_val_accuracy_ratio", COORD, 0.875),
        series("vitpeer_checkpoint_failures_total", {**COORD, "stage": "download"}, 0),
        series("vitpeer_checkpoint_failures_total", {**COORD, "stage": "evaluate"}, "0x20 1x40"),  # one at 7m
        series("vitpeer_checkpoint_failures_total", {**COORD, "stage": "checkpoint"}, 0),
    ]
    return out


def by_peer(*values: float, peers: tuple[str, ...] = (ALICE, BOB)) -> list[tuple[dict[str, str], float]]:
    return [({"peer_id": peer}, value) for peer, value in zip(peers, values, strict=True)]


def by_gpu(*values: float) -> list[tuple[dict[str, str], float]]:
    return [
        ({"peer_id": p, "gpu": g}, v)
        for (p, g), v in zip(((ALICE, "0"), (ALICE, "1"), (BOB, "0")), values, strict=True)
    ]


ALL = (ALICE, BOB, COORDINATOR)
# "<panel id>_<refId>": the samples the panel's expression returns at 10m, labels and value.
EXPECTED: dict[str, list[tuple[dict[str, str], float]]] = {
    "2_A": [({}, 2)],  # alive peers
    "3_A": [({}, 42)],  # swarm epoch: max over peers and coordinator
    "4_A": [({}, 40)],  # newest checkpoint epoch
    "5_A": [({}, 60)],  # its age: 600 - 540 s
    "6_A": [({}, 0.875)],
    "7_A": [({"stage": "download"}, 0), ({"stage": "evaluate"}, 1), ({"stage": "checkpoint"}, 0)],
    "8_A": [({}, 96)],  # swarm samples/s, as the coordinator reports
    "8_B": [({}, 96)],  # 64 + 32: the peers' rates
    "9_A": [({}, 0.625)],
    "10_A": [({"reason": "signature"}, 15), ({"reason": "schema"}, 0)],
    # the per-peer table, one column per query
    "12_A": by_peer(42, 41),
    "12_B": by_peer(64, 32),
    "12_C": by_peer(0.5, 0.75),
    "12_D": by_peer(30 * 1280, 30 * 640),
    "12_E": by_peer(2, 4.5),
    "12_F": [(ALICE_INFO, 1), (BOB_INFO, 1)],
    # what the swarm costs each peer, from the records (see the input)
    "35_A": [({"algorithm": "diloco"}, 2)],
    "36_A": by_peer(MIB, MIB / 2),  # bytes/s
    "37_A": by_peer(4 * MIB, 2 * MIB),  # bytes per averaged round
    "38_A": by_peer(2, 1),  # averaging seconds per averaged round
    "38_B": by_peer(12, 4),  # compute seconds per round
    "39_A": by_peer(0.25, 0.5),  # share of time blocked
    # peers' own exporters, joined to their peer ids
    "14_A": by_peer(64, 32),
    "15_A": by_peer(0.5, 0.75),
    "16_A": [
        ({"peer_id": ALICE, "outcome": "averaged"}, 30),
        ({"peer_id": ALICE, "outcome": "failed"}, 15),
        ({"peer_id": ALICE, "outcome": "alone"}, 0),
        ({"peer_id": BOB, "outcome": "averaged"}, 15),
        ({"peer_id": BOB, "outcome": "failed"}, 0),
        ({"peer_id": BOB, "outcome": "alone"}, 15),
    ],
    "17_A": by_peer(1.5, 1),  # p50
    "17_B": by_peer(5, 1.8),  # p90
    "18_A": by_peer(42, 41, 42, peers=ALL),  # the coordinator sees the swarm epoch too
    "19_A": by_peer(64 / 128, 96 / 128),
    "20_A": by_peer(2, 2),
    "21_A": by_peer(2, 1),
    "40_A": by_peer(2 * MIB, MIB),  # the peers' own exporters: bytes per averaged round
    "41_A": by_peer(0.25, 0.5),  # and share of time blocked
    "22_A": [
        ({"peer_id": ALICE, "outcome": "loaded"}, 0),  # loaded before the time range
        ({"peer_id": ALICE, "outcome": "failed"}, 0),
        ({"peer_id": BOB, "outcome": "loaded"}, 1),
        ({"peer_id": BOB, "outcome": "failed"}, 0),
    ],
    # GPUs: peer-1 has two, peer-2 one, the coordinator none
    "24_A": by_gpu(0.75, 0.5, 0.25),
    "25_A": by_gpu(8 * GIB, 4 * GIB, 2 * GIB),
    "25_B": by_gpu(24 * GIB, 24 * GIB, 16 * GIB),
    "26_A": by_gpu(250, 200, 50),
    "27_A": by_gpu(70, 65, 55),
    "28_A": [({}, 3)],
    "29_A": [
        ({"peer_id": ALICE, "gpu": "0", **RTX}, 1),
        ({"peer_id": ALICE, "gpu": "1", **RTX}, 1),
        ({"peer_id": BOB, "gpu": "0", **T4}, 1),
    ],
    # processes, the coordinator's too
    "31_A": by_peer(0.5, 0.25, 0.125, peers=ALL),
    "32_A": by_peer(1, 2, 0.5, peers=ALL),
    "33_A": by_peer(2 * GIB, GIB, GIB // 2, peers=ALL),
}


def promql_tests() -> list[dict[str, Any]]:
    tests = []
    for key, samples in EXPECTED.items():
        record = f"dashboard:{key}"
        exp = []
        for labels, value in samples:
            inner = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
            exp.append({"labels": f"{record}{{{inner}}}" if inner else record, "value": value})
        tests.append({"expr": record, "eval_time": "10m", "exp_samples": exp})
    return tests


def test_every_expression_has_expected_samples() -> None:
    records = {rule["record"].removeprefix("dashboard:") for rule in recording_rules()}
    assert records == EXPECTED.keys(), (
        f"without expectations: {sorted(records - EXPECTED.keys())}; stale: {sorted(EXPECTED.keys() - records)}"
    )


def test_input_covers_every_queried_metric() -> None:
    recorded = {entry["series"].split("{")[0] for entry in input_series()}
    queried = set().union(*(metric_names(rule["expr"]) for rule in recording_rules()))
    assert queried <= recorded, f"no input series for {sorted(queried - recorded)}"
    assert recorded <= METRICS, f"input series outside the contract: {sorted(recorded - METRICS)}"


def test_expressions_return_what_the_panels_mean(promtool: Path, tmp_path: Path) -> None:
    rules = write_rules(tmp_path)
    spec = {
        "rule_files": [rules.name],
        "evaluation_interval": "20s",
        "tests": [{"interval": "20s", "input_series": input_series(), "promql_expr_test": promql_tests()}],
    }
    test_file = tmp_path / "dashboard.test.yml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [str(promtool), "test", "rules", test_file.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("expr", ['rate(x[$__rate_interval]) * on(instance) y{p=~"$peer"}', "up{a=~'${gpu}'}"])
def test_substitution_leaves_no_variable(expr: str) -> None:
    assert "$" not in substitute(expr)
