-- release: ARGV[3] id, [4] attempt.  A running job of that attempt goes back to
-- the head of its priority (its lane's front, its lane's turn next), its ``lost`` count untouched.  Returns 1 or 0.
local id, attempt = ARGV[3], ARGV[4]
local jk = k_job(id)
if redis.call('EXISTS', jk) == 0 then return 0 end
if redis.call('HGET', jk, 'attempt') ~= attempt then return 0 end
if redis.call('HGET', jk, 'status') ~= '"running"' then return 0 end
local m = model_of(jk)
redis.call('ZREM', k_running(m), id)
redis.call('HSET', jk, 'status', '"waiting"', 'worker', 'null', 'step', '0', 'first_step_at', 'null', 'last_step_at', 'null')
drop_previews(jk, id)
q_push(m, id, level_of(jk), true, redis.call('HGET', jk, 'vec') or '', share_of(jk), stride_of(jk))
q_first(m, level_of(jk), share_of(jk))  -- first of its priority: its lane's turn next
event(id, m, 'change')
return 1
