-- reap: ARGV[3] result TTL, [4] the "lost twice" message JSON, [5] batch size.
-- Expired leases of every model: lost once -> back at the head of the priority,
-- twice -> ``error``.  Expired presence goes.  Returns {Redis TIME, jobs handled}.
local ttl, message, batch = ARGV[3], ARGV[4], tonumber(ARGV[5])
local t = now()
local handled = 0
for _, m in ipairs(redis.call('SMEMBERS', K_MODELS)) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', k_running(m), '-inf', ts(t), 'LIMIT', 0, batch)) do
    redis.call('ZREM', k_running(m), id)
    local jk = k_job(id)
    if redis.call('EXISTS', jk) == 1 and redis.call('HGET', jk, 'status') == '"running"' then
      handled = handled + 1
      if tonumber(redis.call('HGET', jk, 'lost') or '0') == 0 then
        redis.call('HSET', jk, 'lost', '1')
        requeue(m, id, jk)
      else
        redis.call('HINCRBY', jk, 'lost', 1)
        redis.call('HSET', jk, 'status', '"error"', 'message', message, 'finished_at', ts(t))
        into_done(jk, id, t, ttl)
        expire_job(jk, ttl)
        to_outbox(jk, id, t)
      end
      event(id, m, 'change')
    end
  end
  local gone = redis.call('ZRANGEBYSCORE', k_presence(m), '-inf', ts(t), 'LIMIT', 0, batch)
  for _, w in ipairs(gone) do
    redis.call('ZREM', k_presence(m), w)
    redis.call('HDEL', k_worker_info(m), w)
  end
end
return {ts(t), handled}
