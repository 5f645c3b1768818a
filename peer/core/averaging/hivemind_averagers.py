"""The adapter room: every place where vitpeer reaches into hivemind 1.1.12's private names is in this file, in
``hivemind_downloads`` (state downloads) and in ``hivemind_optimizer`` (``SwarmOptimizer``).

hivemind has no public hooks for several things a volunteer swarm needs, so vitpeer overrides or calls some of its
private methods and attributes. They are all in these three files, so that upgrading hivemind means reading them
against the new hivemind's source. ``tests/peer/test_hivemind_adapters.py`` fails on any hivemind other than
``WRITTEN_FOR`` until someone has done that, and fails when a private name listed there (``ADAPTED``) shows up in
any other file. The rest of vitpeer uses only hivemind's public API.

What each adapter here changes in hivemind, and the private names it touches:

- ``_GroupSized``, mixed into hivemind's averager classes: it sends ``_set_group_size`` through the averager's
  ``_outer_pipe``, and in the averager's process sets ``_matchmaking.target_group_size``. In that process it also
  paces ``GroupKeyManager.get_averagers`` (``paced_search``), which hivemind's matchmaking calls in a loop.
- ``_Aggregating``, mixed into every averager of ours: in the averager's process it lends hivemind's module global
  ``hivemind.averaging.allreduce.TensorPartReducer`` our ``AggregatingReducer``, whose accumulator (the private
  ``accumulator``, written by ``accumulate_part`` with ``add_`` and read with ``div_``) collects the parts of a round
  and hands them to the run's aggregation rule (``core.averaging.aggregation``).
- ``hivemind_downloads`` holds the adapters of state downloads: ``_LoadDeadline``, ``_CheckedDownload``.
- ``dht_node_validators`` reads a DHT node's ``record_validator._validators`` to count refused records
  (``core.swarm.records``).
- ``GroupSizedAverager``: a plain ``DecentralizedAverager`` with ``_GroupSized`` and ``_CheckedDownload`` (the DiLoCo
  rounds and state, ``core.algorithms.diloco``).
- ``PlausibleProgressTracker`` wraps hivemind's private ``ProgressTracker._parse_swarm_progress_data``, leaving out
  the progress records that claim an implausible swarm step before hivemind counts them; it reads the tracker's
  ``_local_public_key`` to tell this peer's own record.
- ``sign_with_identity`` makes the RSA key of the peer's libp2p identity file hivemind's process-wide signing key,
  the private class attribute ``RSAPrivateKey._process_wide_key``, holding the loaded key in the private
  ``_private_key`` (hivemind's constructor only generates new keys).
- ``use_our_8bit_codec`` puts ``core.averaging.quantization.Blockwise8BitCompression`` into hivemind's private table of
  decoders, ``hivemind.compression.serialization._BASE_COMPRESSION_TYPES``, under the wire name ``UNIFORM_8BIT``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from types import CoroutineType
from typing import Any, TypeVar

import hivemind
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.averaging import allreduce, key_manager, partition
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.dht.validation import RecordValidatorBase
from hivemind.optim import grad_averager, state_averager
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from vitpeer.peer.core.averaging.aggregation import Aggregation, mean
from vitpeer.peer.core.averaging.hivemind_downloads import _CheckedDownload
from vitpeer.peer.core.averaging.remote_state import plausible_limit
from vitpeer.peer.core.config import ConfigError

log = logging.getLogger(__name__)


# No Lightning and no timm here: ``core.swarm.records`` (which ``vitpeer doctor`` loads) imports this module.

WRITTEN_FOR = "1.1.12"
"""The hivemind version these adapters were written against and read with (a test pins the installed one to it)."""


Found = TypeVar("Found")
SEARCH_EVERY = 0.2
"""Seconds between two DHT lookups of the averagers looking for a group. hivemind's matchmaking looks again as soon
as a lookup found no leader to join, so a peer that began its round before the others did one DHT lookup after
another: measured 2026-12-07 (2 pinned peers, demo config), about 80 lookups per second from each averager, their DHT
processes, averagers and p2pd together taking 35-45 % of the core the peer trained on. A peer that arrives is found
at most this much later; the round runs beside training, which does not wait for it."""


def paced_search(
    get_averagers: Callable[..., CoroutineType[Any, Any, Found]],
) -> Callable[..., CoroutineType[Any, Any, Found]]:
    """``GroupKeyManager.get_averagers`` at most once every ``SEARCH_EVERY`` s per key manager."""

    @functools.wraps(get_averagers)
    async def paced(manager, *args, **kwargs):
        wait = getattr(manager, "_vitpeer_searched", -SEARCH_EVERY) + SEARCH_EVERY - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        manager._vitpeer_searched = time.monotonic()
        return await get_averagers(manager, *args, **kwargs)

    return paced


class _GroupSized:
    """A hivemind averager told how many peers a full group has (mixed into hivemind's two averager classes).

    Without a target group size, hivemind's matchmaking leader keeps its group open for the whole
    ``matchmaking_time`` even when every peer has joined, so every swarm step waited that long for nothing. With the
    size set to the peers the progress tracker counts, the group closes as soon as they are all in; when a counted
    peer is gone (its record not yet expired), the group closes at ``matchmaking_time`` as before. Matchmaking runs
    in the averager's own process: the size travels there through hivemind's command pipe.
    """

    group_size: int | None = None
    _outer_pipe: Connection  # the averager's: hivemind's command pipe to its process
    _matchmaking: Matchmaking  # the averager's, in its process

    def set_group_size(self, size: int) -> None:
        if size != self.group_size:
            self.group_size = size
            # hivemind's averager process runs ``getattr(averager, name)(*args, **kwargs)`` for each pipe message
            self._outer_pipe.send(("_set_group_size", [size], {}))

    async def _set_group_size(self, size: int) -> None:  # runs in the averager's process
        # hivemind fixes the size when the averager starts (``target_group_size``, None for hivemind.Optimizer's
        # averagers) and offers no setter: change it on the live matchmaking, where the leader checks it
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size

    def run(self) -> None:  # the averager's process: its matchmaking is the only user of the key manager here
        key_manager.GroupKeyManager.get_averagers = paced_search(key_manager.GroupKeyManager.get_averagers)
        super().run()  # pyright: ignore[reportAttributeAccessIssue]  # hivemind's DecentralizedAverager.run, next in the MRO


class _RoundParts:
    """Stands in for hivemind's accumulator tensor of one part (``TensorPartReducer.accumulator``): hivemind adds each
    sender's part with ``add_(part, alpha=weight)`` and takes the reduced part with ``div_(total weight)``; here the
    parts are kept, and the reduced part is the aggregation rule's."""

    def __init__(self, aggregation: Aggregation):
        self.aggregation = aggregation
        self.parts: list[torch.Tensor] = []
        self.weights: list[float] = []

    def add_(self, part: torch.Tensor, alpha: float = 1.0) -> _RoundParts:
        self.parts.append(part)
        self.weights.append(float(alpha))
        return self

    def div_(self, denominator: float) -> torch.Tensor:
        return self.aggregation(self.parts, self.weights)


class AggregatingReducer(partition.TensorPartReducer):
    """hivemind's reducer of one all-reduce, reducing each part with ``aggregation`` (``core.averaging.aggregation``)
    instead of its built-in weighted mean. hivemind's own bookkeeping (which sender sent which part, failed senders,
    waiting for the previous part) is unchanged."""

    def __init__(self, part_shapes, num_senders: int, *, aggregation: Aggregation):
        self.aggregation = aggregation  # before super(): its __init__ makes the first accumulator
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        if not self.finished.is_set():  # hivemind made a zero tensor for the next part: collect the parts instead
            self.accumulator = _RoundParts(self.aggregation)


class _Aggregating:
    """An averager whose rounds reduce with ``aggregation`` (mixed into every averager of ours).

    hivemind builds each round's reducer from the module global ``hivemind.averaging.allreduce.TensorPartReducer``
    and takes no reducer argument; the averager runs its rounds in its own process, so that process lends the name our
    ``AggregatingReducer`` for its whole life (no other averager shares the process)."""

    def __init__(self, *args, aggregation: Aggregation = mean, **kwargs):
        self.aggregation = aggregation  # before super() starts the averager's process, which reads it
        super().__init__(*args, **kwargs)

    def run(self) -> None:  # the averager's process
        allreduce.TensorPartReducer = functools.partial(AggregatingReducer, aggregation=self.aggregation)
        super().run()  # pyright: ignore[reportAttributeAccessIssue]  # hivemind's DecentralizedAverager.run, next in the MRO


# hivemind names each averager's RPC protocols after its class (``<prefix>::TrainingStateAverager.rpc_download_state``):
# ours keep hivemind's class names, so they speak with plain hivemind peers and the coordinator.


class GradientAverager(_Aggregating, _GroupSized, grad_averager.GradientAverager):
    """hivemind's gradient averager, with ``_Aggregating`` and ``_GroupSized``."""


class TrainingStateAverager(_Aggregating, _GroupSized, _CheckedDownload, state_averager.TrainingStateAverager):
    """hivemind's training-state averager, with ``_Aggregating``, ``_GroupSized`` and ``_CheckedDownload``."""


class GroupSizedAverager(_Aggregating, _GroupSized, _CheckedDownload, hivemind.DecentralizedAverager):
    """hivemind's plain averager, with ``_Aggregating``, ``_GroupSized`` and ``_CheckedDownload``."""


class PlausibleProgressTracker(ProgressTracker):
    """hivemind's progress tracker, counting only the records that claim a plausible swarm step
    (``remote_state.plausible_limit``: at most one past the step most records agree on, never past ``max_steps``).

    hivemind's ``_parse_swarm_progress_data`` counts every signed record as a peer and takes the swarm's step as the
    maximum of their steps; a record claiming more is left out before hivemind reads them (as a peer, its samples and
    its step), and a log line says how many."""

    def __init__(self, *args, max_steps: int | None = None, **kwargs):
        self.max_steps = max_steps  # before super(): it starts the thread that reads the records
        self.implausible = 0  # records left out at the last read
        super().__init__(*args, **kwargs)

    def _parse_swarm_progress_data(self, metadata):
        if isinstance(metadata, dict) and metadata:
            epochs = {}
            for key, entry in metadata.items():
                if entry.value is not None and key != self._local_public_key:  # this peer's own: its local epoch
                    epochs[key] = LocalTrainingProgress.parse_obj(entry.value).epoch
            limit = plausible_limit([self.local_progress.epoch, *epochs.values()], self.max_steps)
            implausible = {key for key, epoch in epochs.items() if epoch > limit}
            if len(implausible) != self.implausible:
                claims = sorted(epochs[key] for key in implausible)
                log.warning(
                    "%d progress record(s) claim swarm steps %s, past %d (one past the step most peers agree on, "
                    "or the run's last): not counted",
                    len(implausible),
                    claims[:3],
                    limit,
                )
                self.implausible = len(implausible)
            metadata = {key: entry for key, entry in metadata.items() if key not in implausible}
        return super()._parse_swarm_progress_data(metadata)


def use_our_8bit_codec() -> None:
    """Encode and decode ``UNIFORM_8BIT`` tensors with ``core.averaging.quantization.Blockwise8BitCompression``.

    hivemind decodes every received tensor through a module-level table keyed by the wire name, and the protocol has
    no room for a new name; hivemind's own 8-bit decoders fail under numpy 2 (see ``core.averaging.quantization``).
    Call it before any averager process starts (they fork from this one and inherit the table).
    """
    from hivemind.compression import serialization

    from vitpeer.peer.core.averaging.quantization import Blockwise8BitCompression

    serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Blockwise8BitCompression()


def sign_with_identity(identity_path: Path) -> bool:
    """Sign this process's DHT records with the RSA key of the libp2p identity at ``identity_path``, created first
    (as hivemind's ``P2P.generate_identity`` writes it) when the file does not exist. Return whether it was created;
    ConfigError naming the file if it holds no RSA key.

    hivemind signs records (its progress tracker's, our metrics and fingerprints: every ``RSASignatureValidator``
    built without a key) with ``RSAPrivateKey.process_wide()``, a key it generates anew in every process. So a
    restarted peer kept its peer id but signed with a new key, and readers keyed by signer (``read_reports``,
    hivemind's progress tracker, which sizes groups by it) counted its old records as another peer until they
    expired. Signed with the identity key, a record's signer (``core.swarm.records.signer_id``) is the peer id, the
    same after a restart: the new records replace the old ones.

    Call it before building any validator (each keeps the key it was built with) and before the DHT process forks
    (it inherits the key with its class). One process, one identity: a later call with another identity re-keys
    whatever is built after it. hivemind offers no setter: this sets its private class attribute."""
    created = not identity_path.is_file()
    if created:
        P2P.generate_identity(str(identity_path))  # the file p2pd will read: one key for the peer id and the signer
    way_out = "delete it: a new RSA identity is created in its place (with a new peer id)"
    try:
        identity = crypto_pb2.PrivateKey.FromString(identity_path.read_bytes())  # pyright: ignore[reportAttributeAccessIssue]  # hivemind's generated protobuf modules have no types
        kind = crypto_pb2.KeyType.Name(identity.key_type)  # pyright: ignore[reportAttributeAccessIssue]  # as above
        private = serialization.load_der_private_key(identity.data, password=None) if kind == "RSA" else None
    except (DecodeError, ValueError) as err:  # not a protobuf, or no DER key in it
        raise ConfigError(f"swarm.identity_path = {identity_path} is not a libp2p identity ({err}): {way_out}") from err
    if not isinstance(private, rsa.RSAPrivateKey):
        raise ConfigError(
            f"swarm.identity_path = {identity_path} holds a key of type {kind}, and hivemind signs records with RSA "
            f"keys only: {way_out}"
        )
    key = RSAPrivateKey.__new__(RSAPrivateKey)  # its __init__ would generate a key of its own
    key._private_key = private
    RSAPrivateKey._process_wide_key = key
    return created


def catch_up_scheduler(averager: state_averager.TrainingStateAverager) -> None:
    """Step ``averager``'s LR scheduler until it is in step with ``averager.local_epoch``.

    Use it after setting the epoch by hand (a checkpoint restore). hivemind does this itself after a state download,
    in the private ``_update_scheduler``, and has no public way to do it otherwise."""
    averager._update_scheduler()


def dht_node_validators(node) -> list[RecordValidatorBase]:
    """The record validators a running ``DHTNode`` applies (run inside the DHT process, e.g. by
    ``hivemind.DHT.run_coroutine``). hivemind keeps no public accessor: its composite validator's private list."""
    return list(node.protocol.record_validator._validators)


GOODBYE_WAIT = 10.0  # seconds a leaving peer waits for its farewell records to be stored before it goes anyway


def store_farewell(dht: hivemind.DHT, key: str, subkey, expiration: float, what: str) -> None:
    """Store ``None`` under ``key``/``subkey`` (a record's goodbye) and wait for it, at most ``GOODBYE_WAIT`` seconds.

    ``DHT.store`` without a future waits forever: a DHT process too busy to answer (CI saw one, under load) hung the
    leaving peer, and the test process with it. A farewell is a courtesy: leaving never fails or hangs on it, and a
    record not cleared expires on its own."""
    try:
        dht.store(key, None, expiration, subkey=subkey, return_future=True).result(timeout=GOODBYE_WAIT)  # pyright: ignore[reportAttributeAccessIssue]  # a future with return_future=True
    except Exception as err:
        log.warning("could not clear this peer's %s record on leaving (%r); it expires on its own", what, err)


def say_goodbye(dht: hivemind.DHT, tracker) -> None:
    """Tell the others this peer is gone: its progress record set to None, waiting until it is stored.

    hivemind's own goodbye (in ``shutdown``) does not wait for the store, so a DHT shut down right after loses it, and
    the others count this peer, and wait for it in their rounds, until its record expires."""
    expiration = get_dht_time() + tracker.metadata_expiration
    # the record hivemind's own goodbye writes: peers' progress is keyed by their signing key, kept private
    store_farewell(dht, tracker.training_progress_key, tracker._local_public_key, expiration, "progress")
