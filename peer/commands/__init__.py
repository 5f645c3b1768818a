"""The peer's commands: ``vitpeer join``, ``train``, ``demo``, ``doctor``, ``evaluate``, ``profile``, ``plot``.

- ``cli``: the click definitions (``doctor`` and ``profile`` define theirs beside what they run);
- ``join``: one peer's run in the swarm (``run_join``); ``train``: the same without a swarm (``run_train``);
- ``fit``: what ``join`` and ``train`` share: the Trainer's arguments, the callbacks every run records with, the
  run's numbers and ``all_results.json``;
- ``extend``: the real ``vitpeer join`` command line with callbacks of one's own (``run_join``'s ``extra_callbacks``),
  for benchmarks and test faults;
- ``doctor``: ``vitpeer doctor``, its checks in order and their report; ``doctor_host``: the checks of this host
  (Python, torch and its GPUs, hivemind's import, ports); ``doctor_swarm``: the checks of the swarm (the p2p daemon,
  the initial peers, reachability, the coordinator);
- ``demo``: a local swarm of ``join`` processes; ``evaluate``: a checkpoint on a held-out split; ``flops``:
  ``vitpeer profile``.
"""
