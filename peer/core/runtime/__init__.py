"""What every vitpeer process needs, whatever it does: its children reaped, a small HTTP server, metrics on disk.

- ``processes``: nothing outlives its owner (children die with us, ``stop_all``);
- ``http``: the read-only HTTP server of the coordinator's API and every ``/metrics`` endpoint, and the client of the
  coordinator's API;
- ``history``: a run's training history on disk (CSV + JSON) and ``vitpeer plot``;
- ``threads``: how many threads torch computes with, this process's share of the cores it may use.
"""
