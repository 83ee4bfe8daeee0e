"""The relay as a cluster: many workers on many hosts sharing one Redis (CLUSTER.md).

Without `redis_url` none of this is imported and the relay is the
single-process relay of rendezvous.py, with no Redis. With it, Redis holds
only the meeting point of requests and listens: per server a queue of
request heads, the list of parked listens (one node id each) and its
presence; per node (one relay worker) an inbox. Each change to that shared
state is one Lua script, atomic in redis-server, that applies the rules of
rendezvous.py across nodes. Bodies never go through Redis.

Modules:

- `store.py`: the Redis boundary. `Store.from_url` (redis://, rediss://,
  unix://; `redacted(url)` hides the password in every message), short
  timeouts, the scripts loaded by SHA, every Redis error turned into
  `ClusterUnavailableError` (503), one log line per outage.
- `scripts/`: one Lua script per step of the rendezvous (OFFER, PARK,
  UNPARK, WITHDRAW, SETTLE, LEAVE, PRESENCE, SWEEP, the TCP ones, the node
  registry), each the atomic form of a rule of rendezvous.py or forwarding.py.
- `rendezvous.py`: `ClusterRendezvous`, the rendezvous the `Relay` calls,
  with its meeting point in Redis.
- `node.py`: this worker's id, heartbeat, table of peers and inbox
  dispatcher; it carries a response POST to the node holding its client.
- `peering.py`: the peer links that carry bodies between nodes.
- `streams.py`: request bodies, WebSockets and forwarded connections'
  streams carried to the node that holds their client.
- `forwarding.py`: `ClusterForwarding`, TCP port forwarding with its connects
  and listens meeting through Redis (the TCP scripts).
- `ops.py` and `metrics.py`: the operators' side (CLUSTER.md section 5): the
  audit log's shared page, /metrics for every node in one scrape, the config
  each node runs.

`build(config)` makes the node, rendezvous and forwarding for a relay with
`redis_url`.
"""

from __future__ import annotations

from collections.abc import Callable

from ptth_lib.config import RelayConfig
from ptth_lib.relay.cluster.forwarding import ClusterForwarding
from ptth_lib.relay.cluster.node import Node
from ptth_lib.relay.cluster.ops import config_hash
from ptth_lib.relay.cluster.rendezvous import ClusterRendezvous
from ptth_lib.relay.cluster.store import Store
from ptth_lib.relay.cluster.streams import Streams
from ptth_lib.relay.forwarding import ForwardedConnection


def build(config: RelayConfig, on_event: Callable[..., None],
          on_closed: Callable[[ForwardedConnection], None] = lambda conn: None,
          ) -> tuple[Node, ClusterRendezvous, ClusterForwarding]:
    """This worker's node, rendezvous and port forwarding for `config` (which has a `redis_url`).

    `on_event` hears the audit log's events, `on_closed` each forwarded
    connection forgotten (as PortForwarding's). Raises ConfigError for a
    Redis URL that cannot be used; a Redis that cannot be reached is waited
    for (node.py), with 503s meanwhile.
    """
    assert config.redis_url is not None
    store = Store.from_url(config.redis_url)
    node = Node(store, config.peer_bind, config_hash(config))
    rendezvous = ClusterRendezvous(config, store, node.id, on_event=on_event)
    forwarding = ClusterForwarding(config, store, node, rendezvous.settler, on_closed)
    streams = Streams(rendezvous, forwarding)
    node.attach(rendezvous)
    node.forwarding, node.streams = forwarding, streams
    node.calls.update(streams.calls())
    node.calls["tcp_taken"] = forwarding.serve_taken
    return node, rendezvous, forwarding
