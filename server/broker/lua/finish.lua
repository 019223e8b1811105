-- finish: ARGV[3] id, [4] attempt or '', [5] status JSON, [6] result TTL (whole
-- seconds), [7] number of result blobs, then (key, bytes) per blob, then field/JSON
-- pairs.  Refused (false) for an unknown or finished job, or with an attempt that is
-- stale or whose job no longer runs (requeued): then nothing is written, the blobs
-- included (a fenced attempt's images never become the job's).  Else stores the
-- blobs (with the TTL), sets the fields, status and finished_at (Redis TIME), takes
-- the job out of run:{m} and q:{m} (and the sums), into ``done``, sets the TTL of
-- the record and its inputs, releases its owner's quota (quota_release); returns
-- finished_at.
local id, attempt, status, ttl = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local jk = k_job(id)
if redis.call('EXISTS', jk) == 0 then return false end
local current = redis.call('HGET', jk, 'status')
if FINISHED[current] then return false end
if attempt == 'waiting' then  -- only a job that has not started (a missed deadline)
  if current ~= '"waiting"' then return false end
elseif attempt ~= '' and (redis.call('HGET', jk, 'attempt') ~= attempt or current ~= '"running"') then
  return false
end
local m = model_of(jk)
local t = now()
local i = 8
for _ = 1, tonumber(ARGV[7]) do
  redis.call('SET', P .. ARGV[i], ARGV[i + 1], 'EX', ttl)
  i = i + 2
end
set_pairs(jk, i)
redis.call('HSET', jk, 'status', status, 'finished_at', ts(t))
redis.call('ZREM', k_running(m), id)
q_remove(m, id, jk, false)
into_done(jk, id, t, ttl)
expire_job(jk, ttl)
to_outbox(jk, id, t)
event(id, m, 'change')
return ts(t)
