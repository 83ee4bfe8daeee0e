-- NODES: the live nodes, for each node's table of peers (CLUSTER.md section 3; refreshed
-- with the heartbeat every 2 s). Read only.
--
-- No KEYS (see _lib.lua).   ARGV[1] the key prefix
--
-- Answers, for every registered node whose node:{N} has not expired, N followed by its
-- fields as HGETALL gives them, each node's list in a list: {{N, name, value, ...}, ...}.

local P = ARGV[1]
local live = {}
for _, node in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  local fields = redis.call('HGETALL', P .. 'node:' .. node)
  if #fields > 0 then
    table.insert(fields, 1, node)
    live[#live + 1] = fields
  end
end
return live
