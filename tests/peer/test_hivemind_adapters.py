"""The hivemind adapters (``core.averaging.hivemind_averagers``): pinned to the hivemind they were written for.

These tests reach hivemind's private names on purpose: they check the adapters against hivemind itself.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import multiprocessing as mp
import re
import time
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.optim import grad_averager, state_averager
from hivemind.proto import crypto_pb2

from vitpeer.peer.core.averaging import hivemind_averagers, hivemind_downloads
from vitpeer.peer.core.averaging.hivemind_averagers import (
    WRITTEN_FOR,
    GradientAverager,
    TrainingStateAverager,
    sign_with_identity,
)
from vitpeer.peer.core.averaging.hivemind_optimizer import SwarmOptimizer
from vitpeer.peer.core.averaging.remote_state import StateCheck
from vitpeer.peer.core.config import ConfigError


def test_hivemind_is_the_version_the_adapters_were_written_for():
    """Every adapter overrides or reads a private name of hivemind, which any release may change without notice."""
    assert hivemind.__version__ == WRITTEN_FOR, (
        f"hivemind {hivemind.__version__} is installed, but vitpeer's adapters were written for hivemind "
        f"{WRITTEN_FOR}. Before upgrading, re-read every adapter in peer/core/averaging/hivemind_*.py against the new "
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
    "_make_progress_tracker",
    "_parse_swarm_progress_data",
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
    "_load_state_from_peers",
    "_arm_state_check",
    "_declare_for_download_periodically",
    "_state_updated",
    "_validators",
    "_BASE_COMPRESSION_TYPES",
    "_process_wide_key",
    "_private_key",
]
"""The private hivemind names the adapters touch."""


def test_hivemind_s_private_names_are_used_in_the_adapters_only():
    """An upgrade reads one file: a private name used elsewhere would be missed (tests of the adapters excepted)."""
    root = Path(__file__).resolve().parents[2]
    private = re.compile(r"(?<![\w])(" + "|".join(ADAPTED) + r")(?![\w])|optimizer\.TrainingStateAverager\s*=[^=]")
    adapters = set((root / "peer" / "core" / "averaging").glob("hivemind_*.py"))
    assert len(adapters) == 3, adapters
    found = []
    for folder in ("peer", "coordinator", "monitor", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            if path in adapters:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if private.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not found, (
        "private hivemind names outside peer/core/averaging/hivemind_*.py (move them there):\n" + "\n".join(found)
    )


def test_the_download_hook_wraps_hivemind_s_download_as_written():
    """``_CheckedDownload`` hands its own future to hivemind's download loop, which must still take these arguments
    and be the coroutine the averager's process runs for ``load_state_from_peers``."""
    hooked = hivemind.DecentralizedAverager._load_state_from_peers
    assert inspect.iscoroutinefunction(hooked)
    assert list(inspect.signature(hooked).parameters) == ["self", "future", "timeout"]


@pytest.mark.timeout(60)
def test_a_second_download_right_after_a_slow_one_gets_its_full_timeout():
    """Each download has its own deadline: one that begins while the last one's deadline runs is not cut short."""
    timeout = 3.0
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    model = torch.nn.Linear(2, 2)
    opt = None
    try:
        opt = SwarmOptimizer(
            dht=dht,
            run_id="deadline",
            target_batch_size=1000,
            params=model.parameters(),
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            batch_size_per_step=1,
            load_state_timeout=timeout,
            client_mode=False,
        )
        given: list[float] = []  # the timeout of every attempt, as the state averager received it

        def attempt(**kwargs):  # the first attempt fails slowly (hivemind retries), every later one finds no state
            given.append(kwargs["timeout"])
            if len(given) == 1:
                time.sleep(timeout - 1.0)
                raise TimeoutError("a slow peer")
            return None

        opt._loaders[0].load = attempt  # the state averager's download, under the deadline
        opt.load_state_from_peers()
        assert len(given) == 2 and given[1] < timeout - 1.0, given  # the retry got what was left of the deadline
        opt.load_state_from_peers()
        assert len(given) == 3 and given[2] == pytest.approx(timeout), given
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()


def test_an_identity_hivemind_cannot_sign_with_is_refused_naming_the_file(tmp_path: Path):
    """p2pd takes Ed25519 identities too, hivemind's signatures only RSA keys: such a file, or one that is no key at
    all, stops the peer before its DHT starts, with the file and the way out (the signing key is left as it was)."""
    ed25519 = tmp_path / "ed25519.key"
    ed25519.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=bytes(64)).SerializeToString())
    with pytest.raises(ConfigError, match=rf"identity_path = {ed25519} holds a key of type Ed25519.*delete it"):
        sign_with_identity(ed25519)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match=rf"identity_path = {garbage} is not a libp2p identity.*delete it"):
        sign_with_identity(garbage)


class Message:
    """A streamed message of a state download, as far as the budget reads it."""

    def __init__(self, size: int):
        self.size = size

    def ByteSize(self) -> int:  # noqa: N802 (protobuf's name)
        return self.size


async def drain(sizes: list[int], pause: float, max_bytes: int | None) -> tuple[int, int]:
    """Stream messages of ``sizes`` bytes, ``pause`` s apart, through the download budget; (bytes taken, refusals)."""

    async def stream():
        for size in sizes:
            await asyncio.sleep(pause)
            yield Message(size)

    refused = mp.Value(ctypes.c_int, 0)
    armed = hivemind_downloads._budget.set((max_bytes, refused))
    taken = 0
    try:
        async for message in hivemind_downloads._budgeted(stream(), timeout=5.0):
            taken += message.size
    finally:
        hivemind_downloads._budget.reset(armed)
    return taken, refused.value


def test_a_state_download_is_cut_past_its_byte_budget_or_under_its_minimum_rate(monkeypatch):
    """A sender may not stream more than the run's state can take (the state check sees a state only once it is all
    in memory), nor trickle: hivemind's per-message timeout alone lets a sender hold a joiner for its whole
    ``load_state_timeout``, one small message at a time."""
    monkeypatch.setattr(hivemind_downloads, "RATE_GRACE", 0.2)
    assert asyncio.run(drain([1000] * 10, 0.0, 20_000)) == (10_000, 0)
    with pytest.raises(hivemind_downloads.DownloadCut, match="sent over 5000 bytes"):
        asyncio.run(drain([1000] * 10, 0.0, 5000))
    with pytest.raises(hivemind_downloads.DownloadCut, match=r"under 65536 bytes/s"):
        asyncio.run(drain([10] * 20, 0.05, None))


def test_the_budget_of_a_state_is_its_tensors_and_a_margin():
    check = StateCheck(layout=((torch.Size([1000, 10]), torch.float32), (torch.Size([10]), torch.float16)))
    assert check.max_bytes == int((40_000 + 20) * 1.25) + (1 << 20)


def test_matchmaking_s_back_to_back_lookups_are_paced():
    """hivemind's matchmaking calls ``get_averagers`` again as soon as a lookup found no leader: paced, six calls of
    one key manager take at least five intervals, and another key manager is not held up by the first."""
    calls: list[tuple[str, float]] = []

    async def get_averagers(manager, key, only_active):
        calls.append((manager.name, time.monotonic()))
        return []

    paced = hivemind_averagers.paced_search(get_averagers)
    first, second = type("Manager", (), {"name": "first"})(), type("Manager", (), {"name": "second"})()

    async def search():
        for _ in range(6):
            await paced(first, "key", only_active=True)
        await paced(second, "key", only_active=True)

    started = time.monotonic()
    asyncio.run(search())
    times = [at for name, at in calls if name == "first"]
    assert len(times) == 6 and all(
        b - a >= 0.95 * hivemind_averagers.SEARCH_EVERY for a, b in zip(times, times[1:], strict=False)
    )
    assert calls[-1][0] == "second" and calls[-1][1] - times[-1] < hivemind_averagers.SEARCH_EVERY / 2
    assert time.monotonic() - started < 8 * hivemind_averagers.SEARCH_EVERY
