"""What a run is told: the typed configuration, the command-line options made from it, the checks before a start.

Precedence is command line > YAML file > defaults. Every field is documented under it (its docstring is also the
help of its command-line flag), and an error names the key, the value and what is allowed. Nothing here imports
torch, timm or hivemind: a refused value is reported at once.

- ``sections``: the sections of ``RunConfig`` (model, data, optim, trainer, parallel, monitor) and ``ConfigError``;
- ``swarm``: the ``swarm`` section (``SwarmConfig``) and the multiaddrs it takes;
- ``loading``: ``RunConfig`` and ``load_config`` (a data-only YAML file from ``configs/`` with its bases, dotted
  overrides);
- ``options``: the click options every command shares, generated from the fields, and one ``Error:`` line;
- ``preflight``: checks before anything is written or started.

The configuration's public names are importable from this package itself (``from vitpeer.peer.core.config import
RunConfig``).
"""

from vitpeer.peer.core.config.loading import CONFIG_DIR, RunConfig, load_config, resolve_config_path, validated
from vitpeer.peer.core.config.sections import (
    ConfigError,
    DataConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    ParallelConfig,
    Section,
    TrainerConfig,
)
from vitpeer.peer.core.config.swarm import (
    ALGORITHMS,
    SwarmConfig,
    algorithm_named,
    peer_multiaddr_problem,
    split_peer_list,
)

__all__ = [
    "ALGORITHMS",
    "CONFIG_DIR",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "MonitorConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "Section",
    "SwarmConfig",
    "TrainerConfig",
    "algorithm_named",
    "load_config",
    "peer_multiaddr_problem",
    "resolve_config_path",
    "split_peer_list",
    "validated",
]
