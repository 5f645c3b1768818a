"""The adapter room: every place where vitpeer reaches into hivemind 1.1.12's private names is in this file and in
``hivemind_optimizer`` (``SwarmOptimizer``).

hivemind has no public hooks for several things a volunteer swarm needs, so vitpeer overrides or calls some of its
private methods and attributes. They are all in these two files, so that upgrading hivemind means reading them
against the new hivemind's source. ``tests/peer/test_hivemind_adapters.py`` fails on any hivemind other than
``WRITTEN_FOR`` until someone has done that, and fails when a private name listed there (``ADAPTED``) shows up in
any other file. The rest of vitpeer uses only hivemind's public API.

What each adapter here changes in hivemind, and the private names it touches:

- ``_GroupSized``, mixed into hivemind's averager classes: it sends ``_set_group_size`` through the averager's
  ``_outer_pipe``, and in the averager's process sets ``_matchmaking.target_group_size``.
- ``_Aggregating``, mixed into every averager of ours: in the averager's process it lends hivemind's module global
  ``hivemind.averaging.allreduce.TensorPartReducer`` our ``AggregatingReducer``, whose accumulator (the private
  ``accumulator``, written by ``accumulate_part`` with ``add_`` and read with ``div_``) collects the parts of a round
  and hands them to the run's aggregation rule (``core.averaging.aggregation``).
- ``_LoadDeadline`` ends hivemind's endless retry loop of state downloads. It replaces the averagers' public
  ``load_state_from_peers``, but it changes what hivemind's own loop does. Each download is armed with its own
  deadline before hivemind's loop starts; the loop's retries keep it.
- ``_CheckedDownload``, mixed into ``TrainingStateAverager`` and ``GroupSizedAverager``: a downloaded state is
  checked (``StateCheck``) before anyone takes it, inside hivemind's private ``_load_state_from_peers`` (the
  averager's process), which it wraps; the check for each download travels there through ``_outer_pipe``
  (``_arm_state_check``). A refused state raises where hivemind catches a failed peer, so hivemind's own loop goes on
  to the peer with the next priority.
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

import ctypes
import functools
import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import hivemind
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.averaging import allreduce, partition
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.dht.validation import RecordValidatorBase
from hivemind.optim import grad_averager, state_averager
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from vitpeer.peer.core.averaging.aggregation import Aggregation, mean
from vitpeer.peer.core.averaging.remote_state import StateCheck, StateRefused, plausible_limit
from vitpeer.peer.core.config import ConfigError

log = logging.getLogger(__name__)


# No Lightning and no timm here: ``core.swarm.records`` (which ``vitpeer doctor`` loads) imports this module.

WRITTEN_FOR = "1.1.12"
"""The hivemind version these adapters were written against and read with (a test pins the installed one to it)."""


class _LoadDeadline:
    """Wraps an averager's ``load_state_from_peers`` so hivemind's retry loop ends at a deadline.

    ``hivemind.Optimizer.load_state_from_peers`` retries forever while downloads fail (hivemind#453, #653). Before
    the deadline a failure propagates (hivemind retries); after it, the failure is logged and swallowed, so hivemind's
    loop ends and the peer goes on from its local state. Each attempt's own timeout is cut to the time left.

    ``arm`` starts a new download: its deadline is ``timeout`` after its first attempt, and every retry hivemind makes
    until the next ``arm`` shares it. A call without ``arm`` before it (a download outside ``SwarmOptimizer``) is a
    new download of its own.
    """

    def __init__(self, load_state_from_peers: Callable[..., Any], timeout: float):
        self.load, self.timeout = load_state_from_peers, timeout
        self.deadline: float | None = None  # None: the next attempt begins a new download
        self.armed = False
        self.gave_up = False  # the last download ended at the deadline without a state

    def arm(self) -> None:
        """The next call begins a new download with the full ``timeout``."""
        self.deadline, self.armed, self.gave_up = None, True, False

    def __call__(self, wait: bool = True, timeout: float | None = None) -> Any:  # the signature of what it replaces
        now = time.monotonic()
        if self.deadline is None or not self.armed:
            self.deadline, self.gave_up = now + self.timeout, False
        timeout = max(1.0, min(timeout or self.timeout, self.deadline - now))
        try:
            return self.load(wait=wait, timeout=timeout)
        except Exception as err:
            if time.monotonic() < self.deadline:
                raise
            log.warning("giving up loading state from peers after %.0f s (%r); training on", self.timeout, err)
            self.gave_up = True
            return None


class _CheckedResult:
    """Stands for hivemind's future in its download loop: a state that fails ``check`` raises where hivemind catches
    a failed peer, so hivemind tries the peer with the next priority; one that passes goes to ``future``."""

    def __init__(self, future, check: StateCheck | None, refused):
        self.future, self.check, self.refused = future, check, refused

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, result) -> None:
        if result is not None and self.check is not None:
            reason = self.check.refusal(*result)
            if reason is not None:
                with self.refused.get_lock():
                    self.refused.value += 1
                log.warning("refused a state from a peer: %s; trying the next peer", reason)
                raise StateRefused(reason)
        self.future.set_result(result)


class _CheckedDownload:
    """An averager that checks every state it downloads before handing it on (mixed into hivemind's averagers).

    hivemind's download (``DecentralizedAverager._load_state_from_peers``, in the averager's process) asks the peers
    in order of their announced priority and hands on the first state it receives, whatever it holds; its callers
    (``TrainingStateAverager.load_state_from_peers``, ``DiLoCo``, the coordinator) would then apply it. Here the
    state is checked in that loop, against the ``StateCheck`` that ``state_check`` (set by the owner, in this
    process) builds for each download, so a refused peer is skipped and the next one asked. ``refused_states``
    counts the refusals (a counter in shared memory, written in the averager's process)."""

    state_check: Callable[[], StateCheck | None] | None = None
    """Builds the check for the next download (in the host process, when the download begins)."""
    _outer_pipe: Connection  # the averager's: hivemind's command pipe to its process

    def __init__(self, *args, **kwargs):
        self._refused = mp.Value(ctypes.c_int, 0)  # before super() starts the averager's process: it is shared
        self._check: StateCheck | None = None  # the averager process's copy, armed for each download
        super().__init__(*args, **kwargs)

    @property
    def refused_states(self) -> int:
        """States refused since this averager started."""
        return self._refused.value

    def load_state_from_peers(self, *args, **kwargs):
        check = self.state_check() if self.state_check is not None else None
        # pipe messages run in order in the averager's process: the check is in place before the download begins
        self._outer_pipe.send(("_arm_state_check", [check], {}))
        return super().load_state_from_peers(*args, **kwargs)  # pyright: ignore[reportAttributeAccessIssue]  # the averager's, next in the MRO

    async def _arm_state_check(self, check: StateCheck | None) -> None:  # runs in the averager's process
        self._check = check

    async def _load_state_from_peers(self, future, timeout: float | None = None):  # runs in the averager's process
        checked = _CheckedResult(future, self._check, self._refused)
        await super()._load_state_from_peers(checked, timeout=timeout)  # pyright: ignore[reportAttributeAccessIssue]  # the averager's, next in the MRO


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
