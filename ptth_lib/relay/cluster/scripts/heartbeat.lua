-- HEARTBEAT: node N is alive; renew node:{N} and its fields (CLUSTER.md section 6; every 2 s).
--
-- No KEYS (see register.lua).
-- ARGV[1] the key prefix   ARGV[2] N   ARGV[3] the epoch N registered under
-- ARGV[4] how long node:{N} lives unless renewed, ms   ARGV[5...] N's fields, as in REGISTER
--
-- Answers {"alive"}; {"restarted"} if the epoch is missing or another (Redis restarted: N
-- registers again, ends its parked listens and offers its requests again); {"swept"} if the
-- sweeper took N for dead (node:{N} expired and SWEEP cleaned up after it: N's parked listens,
-- inbox and leases are gone, so N must register again under a new id). A node late but not
-- yet swept is alive again: nothing of it was cleaned up.

local P, node = ARGV[1], ARGV[2]
if redis.call('GET', P .. 'epoch') ~= ARGV[3] then
  return {'restarted'}
end
if not is_registered(P, node) then
  return {'swept'}
end
local key = P .. 'node:' .. node
redis.call('HSET', key, unpack(ARGV, 5))
redis.call('PEXPIRE', key, tonumber(ARGV[4]))
return {'alive'}
