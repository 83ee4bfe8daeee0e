-- TCP_LISTEN: a server's listen on port `port` takes a waiting connection, or parks
-- (CLUSTER.md section 4; forwarding.py PortForwarding.listen, in one atomic step).
--
-- KEYS[1] tcp_q:{S}:{port}   KEYS[2] tcp_parked:{S}:{port}   KEYS[3] tcp_ports:{S}
-- (as in tcp_connect.lua)
-- ARGV[1] the key prefix   ARGV[2] S   ARGV[3] port   ARGV[4] the listen's node id N
-- ARGV[5] MAX_LISTENS_PER_PORT   ARGV[6] MAX_PORTS_PER_SERVER
-- ARGV[7] port gone after, ms (PORT_GONE_AFTER_SECS)
--
-- Answers {"took", entry} (a connection whose owner still holds it; entry "id client"),
-- {"parked"}, {"too many"} (MAX_LISTENS_PER_PORT parked on that port), {"too many ports"}
-- (MAX_PORTS_PER_SERVER port names in use; names with no listen now or lately and nothing
-- waiting are forgotten first, as PortForwarding._forget_idle_ports does) or
-- {"unknown node"} (N was swept: it must register again).

local P, S, port, node = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()
if not is_registered(P, node) then
  return {'unknown node'}
end

if redis.call('HEXISTS', KEYS[3], port) == 0 and redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[6]) then
  local ports = redis.call('HGETALL', KEYS[3])
  for i = 1, #ports, 2 do
    local suffix = S .. ':' .. ports[i]
    if now - tonumber(ports[i + 1]) >= tonumber(ARGV[7]) and redis.call('LLEN', P .. 'tcp_parked:' .. suffix) == 0
        and redis.call('LLEN', P .. 'tcp_q:' .. suffix) == 0 then
      redis.call('HDEL', KEYS[3], ports[i])
    end
  end
  if redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[6]) then
    return {'too many ports'}
  end
end

while true do
  local entry = redis.call('LPOP', KEYS[1])
  if not entry then
    break
  end
  if is_held(P, string.match(entry, '^(%S+)')) then -- its client may have given up meanwhile
    redis.call('HSET', KEYS[3], port, now)
    return {'took', entry}
  end
end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[5]) then
  return {'too many'}
end
redis.call('RPUSH', KEYS[2], node)
redis.call('SADD', P .. 'parkedon:' .. node, KEYS[2])
redis.call('HSET', KEYS[3], port, now)
return {'parked'}
