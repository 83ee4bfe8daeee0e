-- REGISTER: a node (one relay worker) joins the cluster under the id it drew, and learns the
-- cluster's epoch and peer secret (CLUSTER.md sections 3 and 6: the node registry).
--
-- No KEYS (node:{N}, nodes, epoch and secret are named from the prefix; see _lib.lua).
-- ARGV[1] the key prefix   ARGV[2] N (NODE_ID_CHARS of base32, drawn at random)
-- ARGV[3] an epoch to set if there is none (random)   ARGV[4] a secret to set if there is none
--   (the one the node already knows, so that a restart keeps it; random for a new node)
-- ARGV[5] how long node:{N} lives unless renewed, ms (NODE_TTL_SECS)
-- ARGV[6...] N's fields, name then value: peer, config, host, pid
--
-- Answers {"registered", epoch, secret} or {"taken", epoch, secret} (another node has that
-- id: draw again). The epoch is set once (SET NX): a node that finds it missing or changed
-- later knows Redis restarted and lost everything. The secret too, so that every node reads
-- the first one set: after a restart, the secret the first node back knew, so links between
-- nodes that have not all noticed the restart yet still pass their handshake. N's leftovers from before a restart cannot exist: Redis lost them.

local P, node = ARGV[1], ARGV[2]
redis.call('SET', P .. 'epoch', ARGV[3], 'NX')
redis.call('SET', P .. 'secret', ARGV[4], 'NX')
local epoch = redis.call('GET', P .. 'epoch')
local secret = redis.call('GET', P .. 'secret')
local key = P .. 'node:' .. node
if is_registered(P, node) or redis.call('EXISTS', key) == 1 then
  return {'taken', epoch, secret}
end
redis.call('SADD', P .. 'nodes', node)
redis.call('HSET', key, unpack(ARGV, 6))
redis.call('PEXPIRE', key, tonumber(ARGV[5]))
return {'registered', epoch, secret}
