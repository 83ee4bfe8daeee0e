-- OFFER: a client's request for server S meets a parked listen, or waits in S's queue
-- (CLUSTER.md section 2; rendezvous.py Rendezvous.submit and _offer, in one atomic step).
--
-- KEYS[1] q:{S}        request heads waiting for a listen (entries: request id, a space, the head)
-- KEYS[2] parked:{S}   one node id per parked listen, oldest first
-- KEYS[3] srv:{S}      hash: seen and left (ms, Redis's clock), features
-- ARGV[1] the entry    ARGV[2] the inbox key prefix ("ptth:inbox:")   ARGV[3] S
-- ARGV[4] most heads queued (MAX_QUEUED_PER_SERVER)
-- ARGV[5] offline after, ms (OFFLINE_AFTER_SECS)   ARGV[6] leave grace, ms (LEAVE_GRACE_SECS)
-- ARGV[7] "front" to queue ahead of the others (a head handed back), else "back"
--
-- Answers {"handed", node} (the head is in that node's inbox), {"queued"}, {"full"} or {"offline"}.
-- The inbox message is "head", a space, S, a space, the entry (server names hold no space;
-- store.py Store.take_inbox reads it).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- A parked listen: the oldest takes the head. Oldest first spreads requests over the
-- processes that share a name (the one that answered last re-polls last).
local node = redis.call('LPOP', KEYS[2])
if node then
  redis.call('RPUSH', ARGV[2] .. node, 'head ' .. ARGV[3] .. ' ' .. ARGV[1])
  -- The listen was there until this instant: the server counts as seen now, so that
  -- the next offer, finding no listen parked, does not call it offline.
  redis.call('HSET', KEYS[3], 'seen', now)
  return {'handed', node}
end

-- No listen parked: online only if one ended lately (ServerState.is_online). After a
-- leave that no listen followed, the name stays online only for the leave's grace.
local seen = tonumber(redis.call('HGET', KEYS[3], 'seen') or '')
local left = tonumber(redis.call('HGET', KEYS[3], 'left') or '')
local offline_after = tonumber(ARGV[5])
if seen and left and left >= seen then
  seen = math.min(seen, left - offline_after + tonumber(ARGV[6]))
end
if not seen or now - seen > offline_after then
  return {'offline'}
end

if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[4]) then
  return {'full'}
end
if ARGV[7] == 'front' then
  redis.call('LPUSH', KEYS[1], ARGV[1])
else
  redis.call('RPUSH', KEYS[1], ARGV[1])
end
return {'queued'}
