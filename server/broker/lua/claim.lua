-- claim: ARGV[3] model, [4] worker (JSON), [5] lease seconds, [6] valid until
-- (Redis TIME; '' = always).  Takes the queue's next job (the first level's
-- fair-share head, lua/queue.lua): attempt + 1, running on the worker from Redis
-- TIME, into run:{m} with the lease deadline.  Returns {the record's HGETALL, the
-- number of jobs left waiting}, or false (also when it runs after ``valid until``:
-- a claim whose sender gave up waiting takes nothing, or the job would run nowhere
-- until its lease expired and count as lost), and while the queue is paused
-- (prelude's ``paused``).
local m, worker, lease = ARGV[3], ARGV[4], tonumber(ARGV[5])
if ARGV[6] and ARGV[6] ~= '' and now() > tonumber(ARGV[6]) then return false end
if paused(m) then return false end
for _ = 1, 16 do
  local id, score, share = q_head(m)
  if id == nil then return false end
  local jk = k_job(id)
  q_take(m, id, score, redis.call('HGET', jk, 'vec') or '', share, true)
  if redis.call('EXISTS', jk) == 1 then
    local t = now()
    redis.call('HINCRBY', jk, 'attempt', 1)
    redis.call('HSET', jk, 'status', '"running"', 'worker', worker, 'started_at', ts(t))
    redis.call('ZADD', k_running(m), ts(t + lease), id)
    event(id, m, 'change')
    return {redis.call('HGETALL', jk), redis.call('ZCARD', k_queue(m))}
  end
end
return false
