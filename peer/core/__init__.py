"""The swarm-member library: everything a peer, the coordinator and the monitor build on (the bottom layer)."""
