-- end_delivery: ARGV[3] job id, [4] retry in seconds ('' = delivered or given up:
-- out of the outbox), then field/JSON pairs set on the record (the outcomes), with
-- a change event, when it still exists.
local id = ARGV[3]
if ARGV[4] == '' then
  redis.call('ZREM', K_OUTBOX, id)
else
  redis.call('ZADD', K_OUTBOX, 'XX', ts(now() + tonumber(ARGV[4])), id)
end
local jk = k_job(id)
if #ARGV >= 5 and redis.call('EXISTS', jk) == 1 then
  set_pairs(jk, 5)
  event(id, model_of(jk), 'change')
end
return 1
