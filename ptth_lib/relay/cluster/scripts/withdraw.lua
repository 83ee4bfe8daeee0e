-- WITHDRAW: at its request timeout the owner asks whether the server ever took the head:
-- remove it from q:{S} if it is still there (CLUSTER.md section 2, "Picked up").
--
-- KEYS[1] q:{S}
-- ARGV[1] the request id followed by a space (how its entry starts)
--
-- Answers 1 if the head was still queued (the server never got it: 502), else 0 (504).
-- Reads at most MAX_QUEUED_PER_SERVER entries, once per request that times out.

local prefix = ARGV[1]
for _, entry in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.sub(entry, 1, #prefix) == prefix then
    redis.call('LREM', KEYS[1], 1, entry)
    return 1
  end
end
return 0
