"""The experiment files vitpeer ships (data only: YAML), read through ``importlib.resources``."""
