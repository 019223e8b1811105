-- update: ARGV[3] id, [4] attempt or '', [5] event kind (change/progress), then
-- field/JSON pairs.  Refused (0) for an unknown job, or with an attempt that is
-- not the current one or a job that no longer runs (stricter than "not finished":
-- a lease that expired put it back in the queue).  Returns 1 when applied.
local id, attempt, kind = ARGV[3], ARGV[4], ARGV[5]
local jk = k_job(id)
if redis.call('EXISTS', jk) == 0 then return 0 end
if attempt ~= '' then
  if redis.call('HGET', jk, 'attempt') ~= attempt then return 0 end
  if redis.call('HGET', jk, 'status') ~= '"running"' then return 0 end
end
set_pairs(jk, 6)
event(id, model_of(jk), kind)
if kind == 'progress' then  -- 2: someone follows the job's progress (write every step)
  local f = redis.call('HGET', jk, 'followed_until')
  if f and f ~= 'null' and tonumber(f) > now() then return 2 end
end
return 1
