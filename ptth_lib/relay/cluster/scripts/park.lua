-- PARK: a server's listen takes the heads queued for it, or waits for one
-- (CLUSTER.md section 2; rendezvous.py Rendezvous.listen, in one atomic step).
--
-- KEYS[1] q:{S}   KEYS[2] parked:{S}   KEYS[3] srv:{S}   (as in offer.lua)
-- ARGV[1] the listen's node id
-- ARGV[2] most heads it takes (0: a server at capacity saying it is still there)
-- ARGV[3] most listens parked (MAX_LISTENERS_PER_SERVER)
-- ARGV[4] most bytes of heads in one answer (MAX_BATCH_BYTES; the first head always goes)
-- ARGV[5] the listen's features, space-separated
--
-- Answers {"took", entry...} (maybe no entry, for 0), {"parked"} (the node's entry is at the
-- end of parked:{S}) or {"too many"} (nothing changed).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[4])

local took = {'took'}
local size = 0
while #took - 1 < limit do
  local entry = redis.call('LINDEX', KEYS[1], 0)
  if not entry then
    break
  end
  if #took > 1 and size + #entry > max_bytes then
    break -- the next listen takes the rest
  end
  redis.call('LPOP', KEYS[1])
  size = size + #entry
  took[#took + 1] = entry
end

if #took == 1 and limit > 0 then
  if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[3]) then
    return {'too many'}
  end
  redis.call('RPUSH', KEYS[2], ARGV[1])
  took = {'parked'}
end
redis.call('HSET', KEYS[3], 'seen', now, 'features', ARGV[5])
return took
