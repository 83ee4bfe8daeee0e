-- TCP_CONNECT: a client's forwarded connection to port `port` of server S meets a parked TCP
-- listen, or waits for one (CLUSTER.md section 4; forwarding.py PortForwarding.connect's
-- checks and offer, and PortForwarding.open_websocket's count, each in one atomic step).
--
-- KEYS[1] tcp_q:{S}:{port}   connection offers waiting for a listen: "id client"
-- KEYS[2] tcp_parked:{S}:{port}   one node id per parked TCP listen, oldest first
-- KEYS[3] tcp_ports:{S}   hash: port -> when a listen on it last ended or began (ms)
-- (and tcp_clients, tcp_servers: hashes of open connections per client and per server)
-- ARGV[1] the key prefix   ARGV[2] S   ARGV[3] port   ARGV[4] the entry ("id client")
-- ARGV[5] "new" for a new connection, "front" for one offered again (its listen ended as it
--         arrived), "open" for a WebSocket, open at once, counted toward S only
-- ARGV[6] port gone after, ms (PORT_GONE_AFTER_SECS)   ARGV[7] MAX_OFFERS_PER_PORT
-- ARGV[8] MAX_CONNECTIONS_PER_CLIENT   ARGV[9] MAX_CONNECTIONS_PER_SERVER
--
-- Answers {"handed", node} (the inbox message is "conn S port entry"), {"queued"},
-- {"port gone"} (no listen on that port now or within PORT_GONE_AFTER_SECS: 502),
-- {"client limit"}, {"server limit"}, {"full"} (503s), {"opened"} (a WebSocket counted), or
-- for "front", {"dropped"} when its owner no longer holds it. A connection counted here is
-- held by its owner (held:{N}) until SETTLE takes it back and lowers the counters.

local P, S, port, entry, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local id, client = string.match(entry, '^(%S+) ?(.*)$')
local clients, servers = P .. 'tcp_clients', P .. 'tcp_servers'

if mode == 'front' then
  if not is_held(P, id) then
    return {'dropped'}
  end
else
  if mode == 'new' and redis.call('LLEN', KEYS[2]) == 0 then
    local last = tonumber(redis.call('HGET', KEYS[3], port) or '')
    if not last or now_ms() - last >= tonumber(ARGV[6]) then
      return {'port gone'}
    end
  end
  if mode == 'new' and tonumber(redis.call('HGET', clients, client) or '0') >= tonumber(ARGV[8]) then
    return {'client limit'}
  end
  if tonumber(redis.call('HGET', servers, S) or '0') >= tonumber(ARGV[9]) then
    return {'server limit'}
  end
  if mode == 'open' then
    redis.call('HINCRBY', servers, S, 1)
    redis.call('HSET', P .. 'held:' .. owner_of(id), id, 'w ' .. S)
    return {'opened'}
  end
end

local node = redis.call('LPOP', KEYS[2])
if not node and redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[7]) then
  return {'full'}
end
if mode == 'new' then
  redis.call('HINCRBY', clients, client, 1)
  redis.call('HINCRBY', servers, S, 1)
  redis.call('HSET', P .. 'held:' .. owner_of(id), id, 'c ' .. S .. ' ' .. client)
end
if node then
  redis.call('RPUSH', P .. 'inbox:' .. node, 'conn ' .. S .. ' ' .. port .. ' ' .. entry)
  -- The listen was there until this instant: the port counts as seen now, so that the next
  -- connect, finding no listen parked while the server listens again, queues instead of
  -- calling the port gone (as OFFER stamps the server seen).
  redis.call('HSET', KEYS[3], port, now_ms())
  return {'handed', node}
end
if mode == 'front' then
  redis.call('LPUSH', KEYS[1], entry)
else
  redis.call('RPUSH', KEYS[1], entry)
end
return {'queued'}
