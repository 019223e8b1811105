-- release: ARGV[3] id, [4] attempt.  A running job of that attempt goes back to
-- the head of its priority (its lane's front, its lane's turn next), its ``lost`` count untouched.  Returns 1 or 0.
local id, attempt = ARGV[3], ARGV[4]
local jk = k_job(id)
if redis.call('EXISTS', jk) == 0 then return 0 end
if redis.call('HGET', jk, 'attempt') ~= attempt then return 0 end
if redis.call('HGET', jk, 'status') ~= '"running"' then return 0 end
local m = model_of(jk)
redis.call('ZREM', k_running(m), id)
requeue(m, id, jk)
event(id, m, 'change')
return 1
