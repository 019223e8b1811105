-- cancel: ARGV[3] id, [4] message JSON, [5] result TTL.  Waiting: out of the
-- queue and the sums, ``cancelled`` now, into ``done``.  Running: the cancel flag
-- and a ``cancel`` event.  Returns {status before (JSON), HGETALL} or false.
local id, message, ttl = ARGV[3], ARGV[4], ARGV[5]
local jk = k_job(id)
if redis.call('EXISTS', jk) == 0 then return false end
local status = redis.call('HGET', jk, 'status')
local m = model_of(jk)
if status == '"waiting"' then
  local t = now()
  q_remove(m, id, jk, false)
  redis.call('HSET', jk, 'status', '"cancelled"', 'message', message, 'finished_at', ts(t))
  into_done(jk, id, t, ttl)
  expire_job(jk, ttl)
  to_outbox(jk, id, t)
  event(id, m, 'change')
elseif status == '"running"' then
  redis.call('HSET', jk, 'cancel', '1')
  event(id, m, 'cancel')
end
return {status, redis.call('HGETALL', jk)}
