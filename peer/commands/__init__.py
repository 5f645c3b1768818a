"""The peer's commands: ``vitpeer join``, ``train``, ``demo``, ``doctor``, ``evaluate``, ``profile``, ``plot``."""
