-- heartbeat: ARGV[3] lease, [4] number of infos, then (model, worker, info JSON)
-- per info, then (job id, attempt) per running job.  Presence deadlines from Redis
-- TIME; leases of current attempts extended.  Returns {Redis TIME, ids to stop}.
local lease, n = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = now()
local i = 5
for _ = 1, n do
  local m, w, info = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  redis.call('ZADD', k_presence(m), ts(t + lease), w)
  redis.call('HSET', k_worker_info(m), w, info)
  redis.call('SADD', K_MODELS, m)
  i = i + 3
end
local stop = {}
while i <= #ARGV do
  local id, attempt = ARGV[i], ARGV[i + 1]
  i = i + 2
  local jk = k_job(id)
  local ok = false
  if redis.call('EXISTS', jk) == 1 and redis.call('HGET', jk, 'status') == '"running"'
      and redis.call('HGET', jk, 'attempt') == attempt then
    local m = model_of(jk)
    if redis.call('ZSCORE', k_running(m), id) then
      redis.call('ZADD', k_running(m), 'XX', ts(t + lease), id)
      ok = redis.call('HGET', jk, 'cancel') ~= '1'
    end
  end
  if not ok then stop[#stop + 1] = id end
end
return {ts(t), stop}
