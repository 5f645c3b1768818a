"""``vitpeer.peer``: a volunteer's peer, in two rooms, and the umbrella command.

- ``core/`` (``vitpeer.peer.core``): the swarm-member library, the bottom layer everything builds on;
- ``commands/`` (``vitpeer.peer.commands``): the peer's commands (join, train, demo, doctor, evaluate, profile, plot);
- ``cli.py``: the ``vitpeer`` command; its subcommands come from the ``vitpeer.commands`` entry points, loaded on use.

Layers (checked by import-linter, ``pyproject.toml``): ``cli`` > ``commands`` | ``vitpeer.coordinator`` >
``vitpeer.monitor`` > ``core``; the benchmarks sit on top of all of them.
"""
