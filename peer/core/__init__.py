"""The swarm-member library: everything a peer, the coordinator and the monitor build on (the bottom layer).

One subpackage per concern, each ``__init__`` mapping its files; top to bottom as import-linter keeps them
(``pyproject.toml``: a room imports only the rooms below it):

- ``lightning``: how a Lightning training loop steps a swarm (``HivemindStrategy``, ``SwarmSteps``), one peer of N
  local ranks, leaving cleanly on SIGTERM, the progress bar;
- ``algorithms``: how peers train together: the interface (``base``), one module per algorithm (``gradient``,
  ``diloco`` with its rounds, shared state and optimizer), the run's state as the coordinator holds it (``observers``);
- ``swarm``: being in the swarm: the DHT node, the signed records every peer publishes and their validators, the
  reporter and the run's fingerprint;
- ``averaging``: averaging with hivemind: the adapter room of hivemind 1.1.12's private names (averagers,
  ``SwarmOptimizer``), the aggregation rule of a round, the poison guard, the downloaded-state check, ``SwarmEvents``,
  vitpeer's 8-bit codec;
- ``model``: timm networks, the LightningModule, the Lightning strategies of several processes (DDP, FSDP2);
  ``data``: image sources, the shared split, the Lightning data module;
- ``config``: the typed run configuration, the command-line options made from it, the checks before a start;
- ``runtime``: what every process needs: nothing outlives its owner, the read-only HTTP server and the coordinator
  client, a run's history on disk and its plots.
"""
