"""The coordinator's own settings; the run's model, data and swarm settings come from the peers' config file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from vitpeer.peer.core.config import RunConfig, Section, SwarmConfig, preflight

DEFAULT_HTTP_PORT = 8470


class CoordinatorConfig(Section):
    state_dir: Path = Path("coordinator-state")
    """Everything the coordinator keeps: identity key, initial_peers.txt, checkpoints/, best/, metrics.jsonl."""
    host_port: int = Field(default=31337, ge=0, le=65535)
    """Fixed TCP port of the DHT node (its address survives restarts). Open it to the internet."""
    host_maddrs: list[str] | None = None
    """Listen multiaddrs instead of all IPv4 interfaces at ``host_port`` (the tests listen on loopback)."""
    announce_ip: str | None = None
    """Public IP to announce when this host is behind NAT with ``host_port`` forwarded."""
    http_host: str = "127.0.0.1"
    """Interface of the read-only HTTP API (/initial-peers, /status, /config, /metrics): this host only by default;
    0.0.0.0 when volunteers, a Prometheus elsewhere or a container's published port must reach it."""
    http_port: int = Field(default=DEFAULT_HTTP_PORT, ge=0, le=65535)
    """Port of the HTTP API; 0 picks a free one (printed at start)."""
    http_names: list[str] = []
    """DNS names volunteers reach the HTTP API by (``--coordinator http://NAME:PORT``). It answers requests for IP
    addresses, localhost and this machine's own name, and for these; any other Host is refused (421), so a web page
    cannot rebind its own name to this address and read the API from a volunteer's browser."""
    checkpoint_every_steps: int = Field(default=50, ge=0)
    """Download, save and evaluate the swarm's state every this many swarm steps; 0: only by time."""
    checkpoint_every_minutes: float = Field(default=30.0, ge=0)
    """... and at least this often (minutes) while the swarm advances; 0: only by steps."""
    keep_last: int = Field(default=3, ge=1)
    """Newest complete checkpoints to keep (the best by validation accuracy is kept as well)."""
    download_timeout: float = Field(default=120.0, gt=0)
    """Seconds a state download may take before it is given up (and retried at the next interval)."""
    eval_batches: int | None = Field(default=None, gt=0)
    """Evaluate each checkpoint on this many validation batches; unset (None): the whole validation split."""
    poll_interval: float = Field(default=2.0, gt=0)
    """Seconds between reads of the peers' metrics records."""

    @model_validator(mode="after")
    def _some_schedule(self) -> CoordinatorConfig:
        if self.checkpoint_every_steps == 0 and self.checkpoint_every_minutes == 0:
            raise ValueError(
                "checkpoint_every_steps and checkpoint_every_minutes are both 0: no checkpoint would ever be written"
            )
        return self

    def swarm(self, run: SwarmConfig) -> SwarmConfig:
        """The run's swarm settings here: fixed port, persistent identity, no initial peers (it is the first node)."""
        return run.model_copy(
            update={
                "initial_peers": [],
                "host_port": self.host_port,
                "host_maddrs": self.host_maddrs,
                "announce_ip": self.announce_ip,
                "identity_path": self.state_dir / "identity.key",
                "client_mode": False,
            }
        )


def check_coordinator(config: RunConfig, coord: CoordinatorConfig) -> None:
    """``vitpeer coordinator``: the DHT and HTTP ports are free, the state directory writable."""
    preflight.check_listen_ports(coord.swarm(config.swarm), prefix="")
    if coord.http_port:
        host = "0.0.0.0" if coord.http_host in ("", "0.0.0.0") else coord.http_host
        preflight.check_port_free(host, coord.http_port, f"http_port = {coord.http_port}", "--http-port")
    preflight.check_writable(coord.state_dir, "state_dir", "--state-dir")
