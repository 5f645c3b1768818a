"""The swarm-member library: everything a peer, the coordinator and the monitor build on (the bottom layer).

- ``config``: the typed run configuration (pydantic, every field documented), loading YAML with bases;
- ``options``: what every command line shares: click options generated from ``config``'s fields, one ``Error:`` line;
- ``preflight``: checks before anything is written or started (no torch, timm or hivemind imported);
- ``data``: image sources, splits and the Lightning data module; ``model``: timm networks and the LightningModule;
- ``parallel``: Lightning strategies and FSDP2 sharding for several processes;
- ``strategy``: ``HivemindStrategy``, the Lightning strategy of one peer (``SwarmSteps``, shared with ``local_ranks``);
- ``local_ranks``: one peer made of a host's N local ranks (DDP, FSDP): rank 0 talks to the swarm, the others follow;
- ``diloco``: the ``diloco`` algorithm's outer loop (background rounds of pseudo-gradients, outer optimizer);
- ``hivemind_averagers``: every use of hivemind 1.1.12's private names (``SwarmOptimizer``, its averagers), pinned;
- ``quantization``: vitpeer's 8-bit codec for averaged tensors;
- ``events``: ``SwarmEvents``, what the swarm optimizer reports to metrics sinks as it happens;
- ``swarm``: starting the DHT node, its addresses, the data-order seed;
- ``records``: the signed DHT records (metrics, fingerprints), their schemas and validators, reading them back;
- ``reporter``, ``fingerprint``: the callbacks that publish those records; ``history``: metrics on disk and plots;
- ``progress``: the progress bar; ``leave``: leaving cleanly on SIGTERM; ``http``: the read-only HTTP server and the
  coordinator client; ``processes``: nothing outlives its owner.
"""
