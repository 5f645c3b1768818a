"""Being in the swarm: the DHT node, and the signed records every peer publishes there.

- ``dht``: starting this peer's DHT node, the addresses others dial, the data-order seed;
- ``records``: the signed DHT records (metrics, fingerprints), their schemas and validators, reading them back;
- ``reporter``: the callback that publishes this peer's metrics record every swarm step;
- ``fingerprint``: what must match across a run, published, and the refusal of a peer that does not match.
"""
