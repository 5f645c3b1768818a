"""What a hostile diloco volunteer sends, for the robust-aggregation benchmark and the hostile tests: the same
``vitpeer join`` with one change, every pseudo-gradient it hands to a round rewritten (``lie_in_rounds``).

``python -m benchmarks.attacks ATTACK join [options]`` runs such a peer; ATTACK is one of ``ATTACKS``:

- ``scale``: 7 times its own pseudo-gradient (passes the check of what a peer receives: not 8 times longer, not
  backwards), an oversized step every round;
- ``flip``: -4 times its own (a scaled sign flip: it pulls the swarm back the way it came);
- ``noise``: its own plus Gaussian noise 4 times as long;
- ``alie``: "a little is enough" (Baruch et al., 2019) as one peer can play it, knowing only its own: its own
  pseudo-gradient minus 1.5 times its per-coordinate spread around the mean (here: its own absolute value), a nudge
  within the honest spread in the direction that slows the swarm.

Each declares a weight of a million samples, which only ``mean`` believes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from vitpeer.peer.core.algorithms import diloco_shared

Lie = Callable[[torch.Tensor], object]


def lie_in_rounds(lie: Lie) -> None:
    """Every pseudo-gradient this peer sends to a diloco round becomes ``lie(buffer)`` (in place), declared with a
    weight of a million samples."""
    step = diloco_shared.OuterAverager.step

    def lying(self, *args, **kwargs):
        with self.get_tensors() as buffers:
            for buffer in buffers:
                lie(buffer)
        return step(self, *args, **{**kwargs, "weight": 1e6})

    diloco_shared.OuterAverager.step = lying


def scaled(factor: float) -> Lie:
    return lambda buffer: buffer.mul_(factor)


def noisy(scale: float) -> Lie:
    def add(buffer: torch.Tensor) -> None:
        noise = torch.randn_like(buffer)
        buffer.add_(noise * (scale * buffer.norm() / noise.norm().clamp_min(1e-12)))

    return add


def alie(spread: float) -> Lie:
    return lambda buffer: buffer.sub_(spread * buffer.abs())


ATTACKS: dict[str, Lie] = {"scale": scaled(7.0), "flip": scaled(-4.0), "noise": noisy(4.0), "alie": alie(1.5)}


if __name__ == "__main__":
    attack, command = sys.argv[1], sys.argv[2:]
    if attack not in ATTACKS or command[:1] != ["join"]:
        sys.exit(f"usage: python -m benchmarks.attacks {{{','.join(ATTACKS)}}} join [vitpeer join options]")
    lie_in_rounds(ATTACKS[attack])
    from vitpeer.peer.cli import main

    main(args=command, prog_name="vitpeer")
