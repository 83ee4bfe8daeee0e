-- SETTLE: requests node N owns are answered or over (CLUSTER.md section 2; rendezvous.py
-- Rendezvous.claim's _untake and Rendezvous.forget, for many requests in one atomic step).
--
-- No KEYS: the requests may be for several servers; each one's keys are named from its
-- record in held:{N} (see _lib.lua).
-- ARGV[1] the key prefix   ARGV[2] N   ARGV[3] MAX_UNANSWERED_PER_SERVER
-- ARGV[4] how many of the ids that follow are "answering" (the rest are "ended")
-- ARGV[5...] request or connection ids:
--   answering: its server has started to answer it; it no longer counts as unanswered
--              (Rendezvous.claim), but its client's share stays taken;
--   ended:     N forgets it: it leaves held:{N}, its share is freed (the nodes waiting for
--              that address's turn hear "turn S address" in their inboxes), it no longer
--              counts as unanswered; for a forwarded connection or WebSocket, its counters
--              go down (PortForwarding._forget).
-- An id N does not hold (settled already, or never held) is skipped: settling twice is safe.
-- Then, wherever that made room, queued heads go to parked listens (the invariant of
-- _lib.lua hand_queued).
--
-- Answers {ended ids that N held, heads handed to parked listens}.

local P, node = ARGV[1], ARGV[2]
local max_unanswered = tonumber(ARGV[3])
local answering = tonumber(ARGV[4])
local now = now_ms()
local freed = {} -- servers where room may have come
local settled = 0

for i = 5, #ARGV do
  local id = ARGV[i]
  if i - 4 <= answering then
    local record = redis.call('HGET', P .. 'held:' .. node, id)
    if record then
      local kind, S = parse_held(record)
      if kind == 'r' and redis.call('SREM', P .. 'taken:' .. S, id) == 1 then
        freed[S] = true
      end
    end
  else
    local held, S = settle_one(P, node, id)
    if held then
      settled = settled + 1
    end
    if S then
      freed[S] = true
    end
  end
end

local handed = 0
for S in pairs(freed) do
  handed = handed + hand_queued(P, S, now, max_unanswered)
end
return {settled, handed}
