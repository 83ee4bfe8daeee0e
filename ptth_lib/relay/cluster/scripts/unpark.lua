-- UNPARK: a listen of node N ends with no head (timeout, hang-up, config change, relay
-- stopping): remove one of N's entries from parked:{S} (CLUSTER.md section 2).
--
-- KEYS[1] parked:{S}   KEYS[2] srv:{S}
-- ARGV[1] N   ARGV[2] "seen" if the listen counts as a sign of life (it was not ended by
-- its server leaving: rendezvous.py Rendezvous.listen's finally), else "unseen"
--
-- Answers 1 if an entry of N was there, 0 if none was left: then an OFFER took it in the
-- meantime and a head is on its way to N's inbox, which N's dispatcher offers again.

local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if ARGV[2] == 'seen' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[2], 'seen', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
return removed
