-- SWEEP: once a second, clean up after nodes that died (CLUSTER.md section 6, "A host
-- dying"). Run by every node each second; only the one that wins the tick runs it.
--
-- No KEYS (a dead node's keys are named from its id; see _lib.lua).
-- ARGV[1] the key prefix   ARGV[2] the node running it   ARGV[3] MAX_UNANSWERED_PER_SERVER
-- ARGV[4] MAX_QUEUED_PER_SERVER   ARGV[5] MAX_OFFERS_PER_PORT
-- ARGV[6] how long a tick holds, ms (a little under the second between runs)
--
-- A node is dead when it is registered (in the nodes set) but node:{N} has expired: it missed
-- its heartbeats for NODE_TTL_SECS. For each, in this order:
--   1. it leaves the nodes set (no script tells it anything from now on; its late heartbeat
--      answers "swept");
--   2. its entries leave every parked list it had entries in (parkedon:{N});
--   3. what it owned is settled as SETTLE would (shares freed, unanswered counts down,
--      connection counters down): its clients were cut with it;
--   4. the heads in its inbox are offered again, ahead of the queue (a head whose owner is
--      gone is dropped); one that finds its queue full goes back to its owner as "requeue";
--      forwarded connections in it likewise;
--   5. the owners of its leased batches (leases:{N}) hear "requeue S id" for each request,
--      and offer it again if it is still unanswered (rendezvous.py Rendezvous.expire_lease);
--   6. its keys are deleted, and queued heads go to parked listens where room came.
--
-- Answers {"busy"} if another node has run it within the tick, else {"ran", swept ids...}.

local P, sweeper = ARGV[1], ARGV[2]
if not redis.call('SET', P .. 'sweep', sweeper, 'NX', 'PX', tonumber(ARGV[6])) then
  return {'busy'}
end
local max_unanswered, max_queued, max_offers = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local swept = {'ran'}
local freed = {}

local function is_wanted_connection(P_, entry)
  return is_held(P_, string.match(entry, '^(%S+)'))
end

-- A head of S from a dead node's inbox, offered again ahead of the others.
local function offer_again(S, entry)
  if not is_wanted(P, entry, now) then
    return
  end
  local id = parse_head(entry)
  redis.call('SREM', P .. 'taken:' .. S, id)
  local parked = P .. 'parked:' .. S
  if redis.call('LLEN', parked) > 0 and has_room(P, S, max_unanswered) then
    give_head(P, S, redis.call('LPOP', parked), entry)
  elseif redis.call('LLEN', P .. 'q:' .. S) < max_queued then
    redis.call('LPUSH', P .. 'q:' .. S, entry)
    redis.call('SADD', P .. 'servers', S)
  else
    tell(P, owner_of(id), 'requeue ' .. S .. ' ' .. id)
  end
end

-- A forwarded connection offered to port `port` of S, from a dead node's inbox.
local function offer_connection_again(S, port, entry)
  if not is_wanted_connection(P, entry) then
    return
  end
  local suffix = S .. ':' .. port
  local parked, queue = P .. 'tcp_parked:' .. suffix, P .. 'tcp_q:' .. suffix
  local node = redis.call('LPOP', parked)
  if node then
    redis.call('RPUSH', P .. 'inbox:' .. node, 'conn ' .. S .. ' ' .. port .. ' ' .. entry)
  elseif redis.call('LLEN', queue) < max_offers then
    redis.call('LPUSH', queue, entry)
  end -- else its owner's connect times out, as when no listen takes it
end

for _, node in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  if redis.call('EXISTS', P .. 'node:' .. node) == 0 then
    swept[#swept + 1] = node
    redis.call('SREM', P .. 'nodes', node)
    for _, list in ipairs(redis.call('SMEMBERS', P .. 'parkedon:' .. node)) do
      redis.call('LREM', list, 0, node)
    end
    local held = redis.call('HKEYS', P .. 'held:' .. node)
    for _, id in ipairs(held) do
      local _, S = settle_one(P, node, id)
      if S then
        freed[S] = true
      end
    end
    for _, message in ipairs(redis.call('LRANGE', P .. 'inbox:' .. node, 0, -1)) do
      local kind, rest = string.match(message, '^(%S+) (.*)$')
      if kind == 'head' then
        local S, entry = string.match(rest, '^(%S+) (.*)$')
        offer_again(S, entry)
        freed[S] = true
      elseif kind == 'conn' then
        local S, port, entry = string.match(rest, '^(%S+) (%S+) (.*)$')
        offer_connection_again(S, port, entry)
      end -- acks, turns, requeues, offlines and leaves were for its own listens and clients
    end
    local leases = redis.call('HVALS', P .. 'leases:' .. node)
    for _, record in ipairs(leases) do
      local S, ids = string.match(record, '^(%S+) (.*)$')
      for id in string.gmatch(ids, '%S+') do
        tell(P, owner_of(id), 'requeue ' .. S .. ' ' .. id)
      end
    end
    redis.call('DEL', P .. 'node:' .. node, P .. 'inbox:' .. node, P .. 'parkedon:' .. node,
               P .. 'held:' .. node, P .. 'leases:' .. node)
  end
end
for S in pairs(freed) do
  hand_queued(P, S, now, max_unanswered)
end
return swept
