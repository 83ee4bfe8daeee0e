-- FAILED: a scraper key from client address A was wrong: count it in A's fixed window, or
-- say A is limited (CLUSTER.md section 5; scraper_api.py FailureLimiter.retry_after and
-- FailureLimiter.fail, in one atomic step, for the whole cluster).
--
-- KEYS[1] scraper_fail:{A}   failures in the current window; the key expires with it
-- ARGV[1] MAX_FAILURES_PER_WINDOW   ARGV[2] FAILURE_WINDOW_SECS in ms
--
-- Answers {1, ms} when A already has its fill of failures in this window (429, Retry-After
-- from the ms left; this attempt is not counted), else {0, failures in the window now}.

local failures = tonumber(redis.call('GET', KEYS[1]) or '0')
if failures >= tonumber(ARGV[1]) then
  local left = redis.call('PTTL', KEYS[1])
  if left < 0 then -- no expiry (cannot happen: it is set with the first failure); restart it
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
    left = tonumber(ARGV[2])
  end
  return {1, left}
end
failures = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]), 'NX')
return {0, failures}
