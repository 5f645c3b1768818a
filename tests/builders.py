"""What several tests build the same way: a peer's metrics record.

Importable because pytest puts ``tests/`` (the root conftest's directory) on ``sys.path``.
"""

from __future__ import annotations

from typing import Any

from hivemind.utils import get_dht_time

from vitpeer.peer.core.swarm.records import PeerReport


def peer_report(**fields: Any) -> PeerReport:
    """A well-formed record of one peer that trained 96 samples in 3 local steps and reports loss 0.5 at swarm step 3,
    now (the DHT's time); ``fields`` replace any of its values or add the optional ones (the algorithm, the costs)."""
    honest = dict(
        peer_id="honest",
        step=3,
        loss=0.5,
        window_samples=32,
        samples_per_second=10.0,
        samples=96,
        mini_steps=3,
        version="test",
        hardware="cpu",
        time=get_dht_time(),
    )
    return PeerReport(**{**honest, **fields})
