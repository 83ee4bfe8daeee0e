"""The relay as a cluster: many workers on many hosts sharing one Redis (CLUSTER.md).

Without `redis_url` none of this is imported and the relay is the
single-process relay of rendezvous.py, with no Redis. With it, Redis holds
only the meeting point of requests and listens: per server a queue of
request heads, the list of parked listens (one node id each) and its
presence; per node (one relay worker) an inbox. Each change to that shared
state is one Lua script, atomic in redis-server, that applies the rules of
rendezvous.py across nodes. Bodies never go through Redis.

What exists so far:

- `store.py`: the Redis boundary. `Store.from_url` (redis://, rediss://,
  unix://; `redacted(url)` hides the password in every message), short
  timeouts, the scripts loaded by SHA, every Redis error turned into
  `ClusterUnavailableError` (503), one log line per outage.
- `scripts/`: OFFER (a request meets a parked listen, or queues), PARK (a
  listen takes queued heads, or parks), UNPARK (a listen ends unserved),
  WITHDRAW (at its timeout, was the request picked up?).

What comes next (CLUSTER.md section 7), none of it wired into the relay yet:
the remaining scripts (fair shares and the unanswered count in OFFER and
SETTLE, leases and acknowledgements, PRESENCE, LEAVE, SWEEP, FAILED, heads'
deadlines, the TCP pair); `node.py` (node id, heartbeat, epoch watch, the
inbox dispatcher, the sweeper); `rendezvous.py` (`ClusterRendezvous`, with
the methods the `Relay` calls); `peering.py` (peer links carrying bodies to
the node that owns a request); `forwarding.py`; `metrics.py`; and
`build(config)`, which `relay/app.py` will call when `redis_url` is set.
"""
