-- The helpers every cluster script shares. store.py puts this file in front of each script
-- before loading it (one source per script, so still one EVALSHA and one round trip); Redis
-- scripts cannot call one another, and handing a head over must read the same in all of them.
--
-- Keys (P is the key prefix, "ptth:"; S a server name, N a node id; CLUSTER.md section 1):
--   P..'q:'..S         request heads waiting for a listen: "id deadline head" (the deadline
--                      in ms since the epoch by the owner's clock, which NTP keeps within
--                      milliseconds of Redis's; 0: none)
--   P..'parked:'..S    one node id per parked listen, oldest first
--   P..'srv:'..S       hash: seen, left (ms), features, version, host, online ("1" once reported)
--   P..'taken:'..S     set: ids handed to a listen and not yet answered (the unanswered count)
--   P..'shares:'..S    hash: client address -> requests in flight (fair shares)
--   P..'turn:'..S..':'..address   set: nodes with a request waiting for that address's turn
--   P..'held:'..N      hash: what node N owns, id -> "r S address" (a request) or
--                      "c S client" (a forwarded connection) or "w S" (a WebSocket)
--   P..'inbox:'..N     list: messages for node N
--   P..'parkedon:'..N  set: the parked lists (full key names) where N may have an entry
--   P..'leases:'..N    hash: batch id -> "S id id ...", N's batches not yet acknowledged
--   P..'node:'..N      hash: peer, config, host, pid; expires unless renewed
--   P..'nodes'         set: every registered node not yet swept
--   P..'servers'       set: servers seen lately, for PRESENCE to look at

-- A node id is this many characters (base32), and every id a node makes starts with it.
local NODE_ID_CHARS = 8

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The node that owns an id (request, batch, connection): its first NODE_ID_CHARS characters.
local function owner_of(id)
  return string.sub(id, 1, NODE_ID_CHARS)
end

-- A queue entry's request id and deadline ("id deadline head"; the head may hold any byte).
local function parse_head(entry)
  local id, deadline = string.match(entry, '^(%S+) (%d+) ')
  return id, tonumber(deadline)
end

-- What held:{N} says about an id: its kind, server and the rest (address or client).
local function parse_held(value)
  return string.match(value, '^(%S+) (%S+) ?(.*)$')
end

local function is_held(P, id)
  return redis.call('HEXISTS', P .. 'held:' .. owner_of(id), id) == 1
end

-- A head is still wanted while its deadline has not passed and its owner still holds the
-- request (an owner that gave up, or died and was swept, no longer does): the atomic form
-- of rendezvous.py's `cancelled` check when a listen takes from the queue.
local function is_wanted(P, entry, now)
  local id, deadline = parse_head(entry)
  if not id then
    return false
  end
  if deadline > 0 and deadline <= now then
    return false
  end
  return is_held(P, id)
end

-- The first wanted entry of a queue, dropping those before it; nil if none.
local function pop_wanted(P, queue, now, wanted)
  while true do
    local entry = redis.call('LPOP', queue)
    if not entry then
      return nil
    end
    if wanted(P, entry, now) then
      return entry
    end
  end
end

-- A message for node N, sent only while N is registered: a swept node's inbox would
-- otherwise be made again and never deleted.
local function tell(P, node, message)
  if redis.call('SISMEMBER', P .. 'nodes', node) == 1 then
    redis.call('RPUSH', P .. 'inbox:' .. node, message)
  end
end

-- A head is with a listen now: it counts as unanswered until its owner settles it.
local function take_head(P, S, entry)
  redis.call('SADD', P .. 'taken:' .. S, (parse_head(entry)))
end

-- A head goes to the parked listen of `node`: into its inbox, counted as unanswered.
local function give_head(P, S, node, entry)
  redis.call('RPUSH', P .. 'inbox:' .. node, 'head ' .. S .. ' ' .. entry)
  take_head(P, S, entry)
end

-- Whether S has room for one more unanswered request (MAX_UNANSWERED_PER_SERVER).
local function has_room(P, S, max_unanswered)
  return redis.call('SCARD', P .. 'taken:' .. S) < max_unanswered
end

-- Hand queued heads to parked listens while both exist and S has room: after every script,
-- never a wanted head queued while a listen is parked and S has room (CLUSTER.md section 2).
-- Answers how many were handed.
local function hand_queued(P, S, now, max_unanswered)
  local queue, parked = P .. 'q:' .. S, P .. 'parked:' .. S
  local handed = 0
  while redis.call('LLEN', parked) > 0 and has_room(P, S, max_unanswered) do
    local entry = pop_wanted(P, queue, now, is_wanted)
    if not entry then
      break
    end
    give_head(P, S, redis.call('LPOP', parked), entry)
    handed = handed + 1
  end
  if handed > 0 then
    redis.call('HSET', P .. 'srv:' .. S, 'seen', now)
  end
  return handed
end

-- Give a client address's share of S back; the nodes waiting for its turn hear of it.
local function free_share(P, S, address)
  local shares = P .. 'shares:' .. S
  if redis.call('HINCRBY', shares, address, -1) <= 0 then
    redis.call('HDEL', shares, address)
  end
  local turn = P .. 'turn:' .. S .. ':' .. address
  for _, node in ipairs(redis.call('SMEMBERS', turn)) do
    tell(P, node, 'turn ' .. S .. ' ' .. address)
  end
  redis.call('DEL', turn)
end

-- The owner is done with id: what it held is given back. Answers whether it held id, and
-- for a request the server whose queue may now be handed on. The atomic form of Rendezvous.forget
-- (share released, untaken) and of PortForwarding._forget (the connection counters).
local function settle_one(P, node, id)
  local held = P .. 'held:' .. node
  local value = redis.call('HGET', held, id)
  if not value then
    return false, nil
  end
  redis.call('HDEL', held, id)
  local kind, S, rest = parse_held(value)
  if kind == 'r' then
    redis.call('SREM', P .. 'taken:' .. S, id)
    if rest ~= '' then
      free_share(P, S, rest)
    end
    return true, S
  end
  if redis.call('HINCRBY', P .. 'tcp_servers', S, -1) <= 0 then
    redis.call('HDEL', P .. 'tcp_servers', S)
  end
  if kind == 'c' and redis.call('HINCRBY', P .. 'tcp_clients', rest, -1) <= 0 then
    redis.call('HDEL', P .. 'tcp_clients', rest)
  end
  return true, nil
end

-- Is server S online by the script's own view (rendezvous.py ServerState.is_online): a
-- listen is parked, or one ended within `offline_after` ms; after a leave that no listen
-- followed, only for the leave's grace.
local function is_online(P, S, now, offline_after, grace)
  if redis.call('LLEN', P .. 'parked:' .. S) > 0 then
    return true
  end
  local srv = P .. 'srv:' .. S
  local seen = tonumber(redis.call('HGET', srv, 'seen') or '')
  local left = tonumber(redis.call('HGET', srv, 'left') or '')
  if seen and left and left >= seen then
    seen = math.min(seen, left - offline_after + grace)
  end
  return seen ~= nil and now - seen <= offline_after
end

-- Is node N registered and not swept (a late node's listens must not park: CLUSTER.md 6).
local function is_registered(P, node)
  return redis.call('SISMEMBER', P .. 'nodes', node) == 1
end

-- ---- the script itself follows ----
