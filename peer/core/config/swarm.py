"""The ``swarm`` section: how this peer joins and trains with the others, and the multiaddrs it is given."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from vitpeer.peer.core.config.sections import Section

if TYPE_CHECKING:  # the registry's entries live above the configuration, and are imported only when asked for
    from vitpeer.peer.core.algorithms.base import SwarmAlgorithm

ALGORITHMS: dict[str, str] = {
    "diloco": "vitpeer.peer.core.algorithms.diloco",
    "gradient": "vitpeer.peer.core.algorithms.gradient",
}
"""The one registry of the ways peers train together: each name ``swarm.algorithm`` takes and the module that
implements it, whose ``ALGORITHM`` is its ``SwarmAlgorithm`` (``core.algorithms.base``). Another algorithm is one
module and one line here. The modules import torch and hivemind only when they build something, so a config is checked
(and refused) before either is imported."""


def algorithm_named(name: str) -> SwarmAlgorithm:
    """The implementation of ``swarm.algorithm = name`` (``ALGORITHMS``)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown swarm.algorithm {name!r}; expected one of {', '.join(sorted(ALGORITHMS))}")
    return importlib.import_module(ALGORITHMS[name]).ALGORITHM


def split_peer_list(values: list[str] | tuple[str, ...]) -> list[str]:
    """Multiaddrs given repeatedly or separated by commas or spaces (as ``join`` and ``doctor`` take them), one list."""
    return [part for value in values for part in str(value).replace(",", " ").split()]


def peer_multiaddr_problem(addr: str) -> str | None:
    """Why ``addr`` is not a peer's full multiaddr (parsed as hivemind parses it, peer id included), or None."""
    if not addr.startswith("/") or "/p2p/" not in addr:
        return "no /p2p/PEER_ID part" if addr.startswith("/") else "a multiaddr starts with /"
    try:
        parsed = multiaddr_class()(addr)  # checks every part: the IP, a numeric port, a base58 multihash peer id
    except Exception as err:  # the parser's errors repeat the address: keep only the reason
        return re.sub(r"^Invalid MultiAddr '.*?'\s*:?\s*", "", str(err)) or type(err).__name__
    if "tcp" not in parsed and "udp" not in parsed:
        return "no /tcp/PORT part"
    return None


STANDALONE_MULTIADDR = "vitpeer_hivemind_multiaddr"


@cache
def multiaddr_class() -> type:
    """hivemind's ``Multiaddr`` (its own copy of py-multiaddr, which needs only base58, cid, netaddr and varint).
    Once hivemind is imported, that one; before, the same files loaded as a package of their own: importing
    ``hivemind.utils.multiaddr`` runs ``hivemind/__init__``, which imports torch, and a refused address should not
    wait for torch (README, When things go wrong, has how long refusals take)."""
    if "hivemind" in sys.modules:
        from hivemind.utils.multiaddr import Multiaddr

        return Multiaddr
    hivemind = importlib.util.find_spec("hivemind")
    if hivemind is None or not hivemind.submodule_search_locations:
        raise ModuleNotFoundError("hivemind is not installed")
    folder = Path(hivemind.submodule_search_locations[0]) / "utils" / "multiaddr"
    spec = importlib.util.spec_from_file_location(
        STANDALONE_MULTIADDR, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"hivemind's multiaddr package cannot be loaded from {folder}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[STANDALONE_MULTIADDR] = package  # its modules import each other relatively, through this name
    spec.loader.exec_module(package)
    return package.Multiaddr


class SwarmConfig(Section):
    run_id: str = "vitpeer"
    """hivemind run id, used as given: peers with the same run id (and model) train together."""
    initial_peers: list[str] = Field(default_factory=list)
    """Multiaddrs of peers already in the swarm (``/ip4/1.2.3.4/tcp/31337/p2p/Qm...``), repeated or separated by
    commas or spaces: the way into the swarm. A peer without any starts a new swarm."""
    host_port: int = Field(default=0, ge=0, le=65535)
    """TCP port to listen on; 0 lets the OS pick one. Open it in your firewall so others can reach you."""
    host_maddrs: list[str] | None = None
    """Listen multiaddrs; unset (None), the peer listens on all IPv4 interfaces at ``host_port``."""
    announce_ip: str | None = None
    """Public IP to announce (behind NAT with a forwarded port); others dial this address."""
    announce_maddrs: list[str] = Field(default_factory=list)
    """Full announce multiaddrs, when ``announce_ip`` is not enough."""
    identity_path: Path | None = None
    """Private key file giving this peer a stable peer id (and so a stable address) across restarts; created on the
    first start. Unset (None): ``identity.key`` in the run's output directory (``vitpeer join``)."""
    client_mode: bool = False
    """Do not accept incoming connections (peer behind a firewall without a forwarded port); uses others to average."""
    use_relay: bool = True
    """Let unreachable peers connect through this one (libp2p circuit relay)."""
    use_auto_relay: bool = False
    """Look for relays automatically and be reachable through them (behind NAT)."""
    target_batch_size: int = Field(default=256, gt=0)
    """Samples the whole swarm accumulates before all peers take one optimizer step (one swarm step)."""
    matchmaking_time: float = Field(default=3.0, gt=0)
    """Seconds to wait for peers to form an averaging group. Raise it on slow or far-apart networks."""
    averaging_timeout: float = Field(default=30.0, gt=0)
    """Seconds before an averaging round is given up and the peer steps with its local gradients."""
    load_state_timeout: float = Field(default=60.0, gt=0)
    """Deadline for downloading the swarm's state when joining or after falling behind; then train from local state."""
    algorithm: str = Field(default="diloco", json_schema_extra={"choices": list(ALGORITHMS)})
    """How the peers train together. ``diloco``: each peer trains alone with its own optimizer for a swarm step, then
    the peers average how far they moved (the pseudo-gradient) in the background and an outer optimizer steps the
    shared parameters; little traffic, no waiting while a round runs. ``gradient``: the peers average gradients
    every swarm step and all take the same optimizer step (hivemind.Optimizer); traffic every swarm step."""
    outer_lr: float = Field(default=0.7, gt=0)
    """``diloco``: learning rate of the outer optimizer (SGD with Nesterov momentum) on the averaged pseudo-gradient.
    1.0 with no momentum would simply average the peers' parameters."""
    outer_momentum: float = Field(default=0.9, ge=0, lt=1)
    """``diloco``: Nesterov momentum of the outer optimizer."""
    sync_every: int = Field(default=16, gt=0)
    """``diloco``: swarm steps between exact (fp32) averagings of the shared parameters and outer momentum, which
    undo the rounding that compressed rounds leave between peers; also at step 1, at the last step, and after a
    round that did not average a peer with every peer it counts."""
    compression: Literal["none", "fp16", "8bit"] | None = None
    """What averaged tensors travel as: ``none`` (fp32), ``fp16`` (half the bytes) or ``8bit`` (a quarter: blockwise
    absmax int8, vitpeer's own codec). Unset: fp16 for ``diloco``'s pseudo-gradients, none for ``gradient``."""

    @property
    def wire_compression(self) -> str:
        """``compression``, or the algorithm's default when unset."""
        if self.compression is not None:
            return self.compression
        return algorithm_named(self.algorithm).default_compression

    aggregation: Literal["mean", "trimmed_mean", "centered_clip"] | None = None
    """How a round turns the parts the peers send into the part each receives (``core.averaging.aggregation``):
    ``mean``, weighted by what each peer declares (hivemind's own rule: one hostile peer moves every peer's model as
    far as it likes); ``trimmed_mean``, per coordinate without the extremes; ``centered_clip``, each peer's part
    clipped around a robust centre. The robust two weigh every peer the same. Applies to every averaging round:
    gradients, parameters, diloco's pseudo-gradients and its exact syncs. Unset: the algorithm's default
    (``centered_clip`` for ``diloco``, ``mean`` for ``gradient``)."""

    @property
    def rule(self) -> str:
        """``aggregation``, or the algorithm's default when unset."""
        if self.aggregation is not None:
            return self.aggregation
        return algorithm_named(self.algorithm).default_aggregation

    local_updates: bool = False
    """Apply local gradients every step and only average parameters each swarm step (fewer bytes, noisier)."""
    average_state_every: int = Field(default=1, gt=0)
    """Swarm steps between rounds that average parameters (hivemind's ``average_state_every``; the last swarm step
    always has one). Each round is a full all-reduce of the model: rounds further apart save that time per swarm
    step, but let the peers' parameters drift apart in between, and a peer that joins or restarts loads state that
    was averaged longer ago. README, Performance, has what we measured both ways."""
    overlap: bool = False
    """Average gradients and run the optimizer in the background while the next batches compute
    (hivemind's delayed parameter updates): parameters lag one swarm step, the peer waits less.
    Experimental and off by default: with two or more peers the swarm does not learn with it yet; a peer started
    with it warns so. README, known limits, has what we found."""
    progress_expiration: float = Field(default=20.0, gt=0)
    """Seconds a peer's progress report lives in the DHT (hivemind's default is 60). A peer that crashed still counts
    as present this long, and a peer restarted after everyone left waits this long before it trains on."""
    startup_timeout: float = Field(default=30.0, gt=0)
    """Seconds the p2p daemon may take to start, its first dial of ``initial_peers`` included: with hivemind's 3 s
    ping after it, the longest a peer waits for initial peers that do not answer (README, When things go wrong, has
    how long that takes for a closed port and for a silent one)."""

    @field_validator("initial_peers", mode="before")
    @classmethod
    def _split_peer_list(cls, value: Any) -> Any:
        """Accept a comma- or space-separated string as well as a list (the old Lightning strategy did not)."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            return split_peer_list(value)
        return value

    @field_validator("initial_peers")
    @classmethod
    def _multiaddrs(cls, value: list[str]) -> list[str]:
        for addr in value:
            problem = peer_multiaddr_problem(addr)
            if problem is not None:
                which = f"{addr!r} is" if len(value) > 1 else "is"  # one address: the key's value shows it
                raise ValueError(
                    f"{which} not a peer multiaddr ({problem}); expected /ip4/HOST/tcp/PORT/p2p/PEER_ID, "
                    "as the first peer prints it"
                )
        return value

    @field_validator("algorithm")
    @classmethod
    def _registered(cls, value: str) -> str:
        algorithm_named(value)  # refuses an unknown name, naming the registered ones
        return value

    @model_validator(mode="after")
    def _compatible_modes(self) -> SwarmConfig:
        refusal = algorithm_named(self.algorithm).refusal(self)  # pyright: ignore[reportArgumentType]  # the checker loads this file twice, as peer.core... and (through .typecheck) as vitpeer.peer.core...: one class
        if refusal is not None:
            raise ValueError(refusal)
        return self
