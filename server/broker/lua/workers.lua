-- workers: ARGV[3..] models (none: every model).  The presence of the live workers
-- (their leases not expired at Redis TIME) of those models, each as its stored JSON.
local models = {}
for i = 3, #ARGV do models[#models + 1] = ARGV[i] end
if #models == 0 then models = redis.call('SMEMBERS', K_MODELS) end
local t = ts(now())
local out = {}
for _, m in ipairs(models) do
  local names = redis.call('ZRANGEBYSCORE', k_presence(m), t, '+inf')
  if #names > 0 then
    for _, raw in ipairs(redis.call('HMGET', k_worker_info(m), unpack(names))) do
      if raw then out[#out + 1] = raw end
    end
  end
end
return out
