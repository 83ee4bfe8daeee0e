-- OFFER: a client's request for server S meets a parked listen, or waits in S's queue
-- (CLUSTER.md section 2; rendezvous.py Rendezvous.submit and _offer, in one atomic step:
-- presence, features, the client's fair share, the queue's bound, the unanswered bound).
-- Again (a head handed back: its listen ended as it arrived, or its lease ran out): the
-- atomic form of Rendezvous.requeue and _offer_or_fail.
--
-- KEYS[1] q:{S}   KEYS[2] parked:{S}   KEYS[3] srv:{S}   KEYS[4] shares:{S}   (see _lib.lua)
-- ARGV[1] the entry ("id deadline head")   ARGV[2] the key prefix ("ptth:")   ARGV[3] S
-- ARGV[4] most heads queued (MAX_QUEUED_PER_SERVER)
-- ARGV[5] offline after, ms (OFFLINE_AFTER_SECS)   ARGV[6] leave grace, ms (LEAVE_GRACE_SECS)
-- ARGV[7] "new" for a new request; "back" or "front" for one offered again, queued behind
--         or ahead of the others
-- ARGV[8] the client's address for its fair share ("" for none)   ARGV[9] requests_per_address
-- ARGV[10] the features the request needs, space-separated   ARGV[11] MAX_UNANSWERED_PER_SERVER
-- ARGV[12] how long a node waits for its client's turn, ms (shares.py TURN_WAIT_SECS)
-- ARGV[13] "1": a listen parked on the owner's own node takes the head first ("" : the oldest)
--
-- Answers {"handed", node} (the head is in that node's inbox), {"handed", owner, "here"} (a
-- listen of the owner's own node took it: the owner hands it over itself, no inbox), {"queued"}, {"full"},
-- {"offline"}, {"no feature", feature} or {"wait"} (the address has its fill in flight; the
-- node hears "turn" in its inbox when a share of it is freed). Again: {"gone"} when the
-- owner no longer holds the request (it gave up) or its deadline passed; presence, features
-- and shares are not asked again. A new request is held by its owner (held:{N}) from here
-- until SETTLE, unless the answer is offline, no feature, wait or full.
-- The inbox message is "head", a space, S, a space, the entry (store.py reads it).

local P, S, entry, mode = ARGV[2], ARGV[3], ARGV[1], ARGV[7]
local now = now_ms()
local id = parse_head(entry)
local max_unanswered = tonumber(ARGV[11])

if mode == 'new' then
  if not is_online(P, S, now, tonumber(ARGV[5]), tonumber(ARGV[6])) then
    return {'offline'}
  end
  local features = ' ' .. (redis.call('HGET', KEYS[3], 'features') or '') .. ' '
  for feature in string.gmatch(ARGV[10], '%S+') do
    if not string.find(features, ' ' .. feature .. ' ', 1, true) then
      return {'no feature', feature}
    end
  end
  local address, per_address = ARGV[8], tonumber(ARGV[9])
  if address ~= '' and tonumber(redis.call('HGET', KEYS[4], address) or '0') >= per_address then
    local turn = P .. 'turn:' .. S .. ':' .. address
    redis.call('SADD', turn, owner_of(id))
    redis.call('PEXPIRE', turn, tonumber(ARGV[12]))
    return {'wait'}
  end
else
  if not is_wanted(P, entry, now) then
    return {'gone'}
  end
  redis.call('SREM', P .. 'taken:' .. S, id) -- it is no longer with a listen
end

-- A parked listen takes the head if the server has room for one more unanswered request:
-- one on the owner's node if there is one, else the oldest. Oldest first spreads requests
-- over the processes that share a name (the one that answered last re-polls last).
local hand = redis.call('LLEN', KEYS[2]) > 0 and has_room(P, S, max_unanswered)
if not hand and redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[4]) then
  return {'full'}
end
if mode == 'new' then
  if ARGV[8] ~= '' then
    redis.call('HINCRBY', KEYS[4], ARGV[8], 1)
  end
  redis.call('HSET', P .. 'held:' .. owner_of(id), id, 'r ' .. S .. ' ' .. ARGV[8])
end
if hand then
  -- The listen was there until this instant: the server counts as seen now, so that
  -- the next offer, finding no listen parked, does not call it offline.
  redis.call('HSET', KEYS[3], 'seen', now)
  -- A listen parked on the owner's own node takes it first: no inbox hop, and the
  -- server's answer, sent back on the listen's connection's node, need not cross.
  local owner = owner_of(id)
  if ARGV[13] == '1' and redis.call('LREM', KEYS[2], 1, owner) == 1 then
    take_head(P, S, entry)
    return {'handed', owner, 'here'}
  end
  local node = redis.call('LPOP', KEYS[2])
  give_head(P, S, node, entry)
  return {'handed', node}
end
if mode == 'front' then
  redis.call('LPUSH', KEYS[1], entry)
else
  redis.call('RPUSH', KEYS[1], entry)
end
redis.call('SADD', P .. 'servers', S) -- PRESENCE fails it if S goes offline
return {'queued'}
