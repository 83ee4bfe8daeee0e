-- PARK: a server's listen takes the heads queued for it, or waits for one
-- (CLUSTER.md section 2; rendezvous.py Rendezvous.listen with _wait_for_room and _take, and
-- Rendezvous.ack for the acknowledgement it carries, in one atomic step).
--
-- KEYS[1] q:{S}   KEYS[2] parked:{S}   KEYS[3] srv:{S}   (see _lib.lua)
-- ARGV[1] the listen's node id N
-- ARGV[2] most heads it takes (0: a server at capacity saying it is still there)
-- ARGV[3] most listens parked (MAX_LISTENERS_PER_SERVER)
-- ARGV[4] most bytes of heads in one answer (MAX_BATCH_BYTES; the first head always goes)
-- ARGV[5] the listen's features, space-separated   ARGV[6] the key prefix   ARGV[7] S
-- ARGV[8] MAX_UNANSWERED_PER_SERVER
-- ARGV[9] the batch id to lease what it takes under ("" for a server that does not
--         acknowledge): leases:{N} records it until the ack, so that if N dies the sweeper
--         can tell the owners to requeue (Rendezvous.listen's `lease`)
-- ARGV[10] the batch id this listen acknowledges ("" for none): its record leaves
--          leases:{L} (L: the node the batch id names) and L hears "ack S batch" in its
--          inbox, unless L gave the batch up first (end_lease)
-- ARGV[11] the server's version   ARGV[12] its host (as it reports them; "" unknown)
--
-- Answers {"took", entry...} (maybe no entry, for 0), {"parked"} (N's entry is at the end of
-- parked:{S}), {"too many"} or {"unknown node"} (N was swept: it must register again; only
-- the acknowledgement was taken). With S's unanswered requests at their bound the listen
-- parks even if heads are queued; SETTLE hands them on when room comes.

local P, S, node = ARGV[6], ARGV[7], ARGV[1]
local now = now_ms()
local limit = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[4])
local lease, ack = ARGV[9], ARGV[10]

if ack ~= '' then
  local holder = owner_of(ack)
  local leases = P .. 'leases:' .. holder
  local record = redis.call('HGET', leases, ack)
  if record and string.sub(record, 1, #S + 1) == S .. ' ' then -- only S's own batch
    redis.call('HDEL', leases, ack)
    tell(P, holder, 'ack ' .. S .. ' ' .. ack)
  elseif not record then
    -- A batch of heads that came through the holder's inbox has no record (a round trip
    -- saved per batch); the holder checks that the batch is S's before taking the ack.
    tell(P, holder, 'ack ' .. S .. ' ' .. ack)
  end
end

if not is_registered(P, node) then
  return {'unknown node'}
end

local room = tonumber(ARGV[8]) - redis.call('SCARD', P .. 'taken:' .. S)
local took = {'took'}
local ids = {}
local size = 0
while #ids < math.min(limit, room) do
  local entry = redis.call('LINDEX', KEYS[1], 0)
  if not entry then
    break
  end
  if not is_wanted(P, entry, now) then
    redis.call('LPOP', KEYS[1]) -- its owner gave up, or its deadline passed
  else
    if #ids > 0 and size + #entry > max_bytes then
      break -- the next listen takes the rest
    end
    redis.call('LPOP', KEYS[1])
    size = size + #entry
    took[#took + 1] = entry
    ids[#ids + 1] = (parse_head(entry))
  end
end

if #ids == 0 and limit > 0 then
  if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[3]) then
    return {'too many'}
  end
  redis.call('RPUSH', KEYS[2], node)
  redis.call('SADD', P .. 'parkedon:' .. node, KEYS[2])
  took = {'parked'}
elseif #ids > 0 then
  redis.call('SADD', P .. 'taken:' .. S, unpack(ids))
  if lease ~= '' then
    redis.call('HSET', P .. 'leases:' .. node, lease, S .. ' ' .. table.concat(ids, ' '))
  end
end
redis.call('HSET', KEYS[3], 'seen', now, 'features', ARGV[5])
if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[3], 'version', ARGV[11])
end
if ARGV[12] ~= '' then
  redis.call('HSET', KEYS[3], 'host', ARGV[12])
end
redis.call('SADD', P .. 'servers', S)
return took
