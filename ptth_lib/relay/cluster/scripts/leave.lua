-- LEAVE: a process of server S says it is stopping (http_leave, on any node): count it gone
-- soon, and end S's parked listens on every node (CLUSTER.md section 2; rendezvous.py
-- Rendezvous.leave). Other processes sharing the name listen again at once and keep it online.
--
-- KEYS[1] parked:{S}   KEYS[2] srv:{S}   (see _lib.lua)
-- ARGV[1] the key prefix   ARGV[2] S
--
-- Stamps "left" (OFFER and PRESENCE then give the name only LEAVE_GRACE_SECS unless a listen
-- follows) and pushes "leave S" once to each node with an entry in parked:{S}; those nodes
-- end their listens for S (204) and UNPARK them as "unseen". Answers how many nodes it told.

local P, S = ARGV[1], ARGV[2]
redis.call('HSET', KEYS[2], 'left', now_ms())
local told = {}
local count = 0
for _, node in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if not told[node] then
    told[node] = true
    tell(P, node, 'leave ' .. S)
    count = count + 1
  end
end
return count
