-- claim_deliveries: ARGV[3] job id ('' = any), [4] lease seconds, [5] how many.
-- Due outbox entries (that one, or the first ``how many``) become due again only
-- after the lease (a drainer that dies mid-delivery leaves them to another).
-- Returns their ids.
local t = now()
local lease = tonumber(ARGV[4])
local ids
if ARGV[3] ~= '' then
  local s = redis.call('ZSCORE', K_OUTBOX, ARGV[3])
  if not s or tonumber(s) > t then return {} end
  ids = {ARGV[3]}
else
  ids = redis.call('ZRANGEBYSCORE', K_OUTBOX, '-inf', ts(t), 'LIMIT', 0, tonumber(ARGV[5]))
end
for _, id in ipairs(ids) do redis.call('ZADD', K_OUTBOX, 'XX', ts(t + lease), id) end
return ids
