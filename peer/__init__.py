"""vitpeer core: the library the coordinator and monitor build on."""
