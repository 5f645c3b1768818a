"""The benchmark code measures what it says: a small all-reduce really averages and its wire bytes are counted, and
the table judges each figure against its goal."""

from __future__ import annotations

import pytest

from benchmarks import averaging
from benchmarks.run import rows


def test_small_allreduce_is_timed_and_its_bytes_counted():
    numel = 200_000
    measured = averaging.allreduce_rounds("none", numel=numel, rounds=1)[0]
    assert 0 < measured["allreduce_s"] < 30 and measured["matchmaking_s"] < 30
    assert measured["mean_abs_error"] < 1e-6  # both peers hold the true mean afterwards
    # a 2-peer all-reduce: each peer sends half its vector and gets half back, fp32 -> numel * 4 bytes per peer
    per_peer = measured["loopback_bytes"] / 2
    assert numel * 4 <= per_peer < numel * 4 * 1.3, per_peer
    assert averaging.raw_tcp_seconds(numel * 4) > 0


@pytest.mark.parametrize(("ratio", "met"), [(0.99, "yes"), (0.80, "no")])
def test_table_judges_each_figure_against_its_goal(ratio: float, met: str):
    results = {
        "overhead": {"digits_tiny": {"ratio": ratio, "hivemind_samples_per_s": 99.0, "lightning_samples_per_s": 100.0}}
    }
    (row,) = [row for row in rows(results) if row[0].startswith("strategy overhead")]
    assert row[2] == ">= 0.97" and row[3] == met, row
