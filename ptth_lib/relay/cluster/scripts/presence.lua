-- PRESENCE: once a second, for the whole cluster, servers coming online and going offline
-- (CLUSTER.md section 2; rendezvous.py Rendezvous.watch_presence with _announce and
-- _fail_waiting). Run by every node each second; only the one that wins the tick runs it.
--
-- No KEYS (the servers are those in the servers set; see _lib.lua).
-- ARGV[1] the key prefix   ARGV[2] the node running it
-- ARGV[3] offline after, ms (OFFLINE_AFTER_SECS)   ARGV[4] leave grace, ms (LEAVE_GRACE_SECS)
-- ARGV[5] how long a tick holds, ms (a little under the second between runs)
--
-- Answers {"busy"} if another node has run it within the tick. Else {"ran", events, failed}:
-- events is a list of {S, "online" or "offline", host, version}, the flips of srv:{S}'s
-- "online" (so exactly one node records each in the audit log); failed is how many queued
-- heads of servers gone offline were moved out of their queues: each owner hears
-- "offline S id" in its inbox and answers its client 502 (it alone knows whether the
-- request may have reached the server already: rendezvous.py keeps those waiting).
-- A server offline (reported so by now, nothing queued) leaves the servers set until a listen
-- or a queued head brings it back (PARK and OFFER add it).

local P, ticker = ARGV[1], ARGV[2]
if not redis.call('SET', P .. 'presence_tick', ticker, 'NX', 'PX', tonumber(ARGV[5])) then
  return {'busy'}
end
local now = now_ms()
local offline_after, grace = tonumber(ARGV[3]), tonumber(ARGV[4])
local events = {}
local failed = 0
for _, S in ipairs(redis.call('SMEMBERS', P .. 'servers')) do
  local srv, queue = P .. 'srv:' .. S, P .. 'q:' .. S
  local online = is_online(P, S, now, offline_after, grace)
  local reported = redis.call('HGET', srv, 'online') == '1'
  if online ~= reported then
    redis.call('HSET', srv, 'online', online and '1' or '0')
    local info = redis.call('HMGET', srv, 'host', 'version')
    events[#events + 1] = {S, online and 'online' or 'offline', info[1] or '', info[2] or ''}
  end
  if not online then
    for _, entry in ipairs(redis.call('LRANGE', queue, 0, -1)) do
      if is_wanted(P, entry, now) then
        local id = parse_head(entry)
        tell(P, owner_of(id), 'offline ' .. S .. ' ' .. id)
        failed = failed + 1
      end
    end
    redis.call('DEL', queue)
    redis.call('SREM', P .. 'servers', S) -- reported offline by now, with nothing queued
  end
end
return {'ran', events, failed}
