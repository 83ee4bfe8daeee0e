-- TCP_UNPARK: a parked TCP listen of node N ends with no connection: remove one of N's
-- entries, and count the port as listened until now (forwarding.py PortForwarding.listen's
-- finally: _last_listen).
--
-- KEYS[1] tcp_parked:{S}:{port}   KEYS[2] tcp_ports:{S}   ARGV[1] N   ARGV[2] port
--
-- Answers 1 if an entry of N was there, 0 if none was left: then a TCP_CONNECT took it in the
-- meantime and a connection is on its way to N's inbox, which N offers again ("front").

local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], now_ms())
return removed
