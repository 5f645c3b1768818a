"""The hivemind adapters (``core.hivemind_adapters``): pinned to the hivemind they were written for.

These tests reach hivemind's private names on purpose: they check the adapters against hivemind itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import hivemind
from hivemind.optim import grad_averager, state_averager

from vitpeer.peer.core.hivemind_adapters import WRITTEN_FOR, GradientAverager, TrainingStateAverager


def test_hivemind_is_the_version_the_adapters_were_written_for():
    """Every adapter overrides or reads a private name of hivemind, which any release may change without notice."""
    assert hivemind.__version__ == WRITTEN_FOR, (
        f"hivemind {hivemind.__version__} is installed, but vitpeer's adapters were written for hivemind "
        f"{WRITTEN_FOR}. Before upgrading, re-read every adapter in peer/core/hivemind_adapters.py against the new "
        "hivemind's source (each private method it overrides or calls, each private attribute it reads, the module "
        "global it lends), run the swarm tests, then set WRITTEN_FOR to the new version"
    )


def test_our_averagers_speak_the_protocols_of_hivemind_s_own():
    """hivemind names RPC protocols after the averager's class: a subclass with another name could not download
    state from the coordinator, or average with a peer running plain hivemind."""
    for ours, theirs in [
        (GradientAverager, grad_averager.GradientAverager),
        (TrainingStateAverager, state_averager.TrainingStateAverager),
    ]:
        assert ours is not theirs and issubclass(ours, theirs)
        for method in ("rpc_join_group", "rpc_aggregate_part", "rpc_download_state"):
            assert ours._get_handle_name("run", method) == theirs._get_handle_name("run", method)


ADAPTED = [
    "_make_state_averager",
    "_make_gradient_averager",
    "_maybe_schedule_gradient_averaging",
    "_maybe_schedule_state_averaging",
    "_check_and_accumulate_gradients",
    "_begin_averaging_gradients",
    "_average_gradients_and_load_into_optimizer",
    "_apply_optimizer_parameters_",
    "_apply_averaging_results_",
    "_update_scheduler",
    "_local_public_key",
    "_outer_pipe",
    "_matchmaking",
    "_set_group_size",
    "_validators",
    "_BASE_COMPRESSION_TYPES",
]
"""The private hivemind names the adapters touch."""


def test_hivemind_s_private_names_are_used_in_the_adapters_only():
    """An upgrade reads one file: a private name used elsewhere would be missed (tests of the adapters excepted)."""
    root = Path(__file__).resolve().parents[2]
    private = re.compile(r"(?<![\w])(" + "|".join(ADAPTED) + r")(?![\w])|optimizer\.TrainingStateAverager\s*=[^=]")
    adapters = root / "peer" / "core" / "hivemind_adapters.py"
    found = []
    for folder in ("peer", "coordinator", "monitor", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            if path == adapters:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if private.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not found, "private hivemind names outside peer/core/hivemind_adapters.py (move them there):\n" + "\n".join(
        found
    )
