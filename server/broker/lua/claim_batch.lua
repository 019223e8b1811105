-- claim_batch: ARGV[3] model, [4] worker (JSON), [5] lease seconds, [6] valid until
-- (Redis TIME; '' = always), [7] the planned head's id, [8] the number k of
-- companions, then their ids (run order), then the window: every waiting job the
-- plan saw from the head through its last companion (run order).  When the queue's
-- next job (lua/queue.lua) is the planned head and no waiting job the window does not
-- list runs before the last companion still waiting with the head's ``batch`` key:
-- the head and those companions are claimed as ``claim`` claims one (attempt + 1,
-- running on the worker from Redis TIME, into run:{m} with the lease deadline; each
-- uses a turn of its lane), and their HGETALLs returned, the head's first; else
-- nothing ({}), and the worker claims as usual.  Nothing while the queue is paused
-- (prelude's ``paused``).
local m, worker, lease, head = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[7]
if ARGV[6] ~= '' and now() > tonumber(ARGV[6]) then return {} end
if paused(m) then return {} end
local top, top_score = q_head(m)
if top ~= head then return {} end
local key = redis.call('HGET', k_job(head), 'batch')
if not key or key == '""' then return {} end
local k = tonumber(ARGV[8])
local ids, scores = {head}, {top_score}
for i = 9, 8 + k do
  local s = redis.call('ZSCORE', k_queue(m), ARGV[i])
  if s and redis.call('HGET', k_job(ARGV[i]), 'batch') == key then
    ids[#ids + 1] = ARGV[i]
    scores[#scores + 1] = tonumber(s)
  end
end
if #ids > 1 then  -- every waiting job ahead of the last companion was seen by the plan
  local last, seen, found = ids[#ids], 0, false
  for i = 9 + k, #ARGV do
    if ARGV[i] == last then found = true; break end
    if redis.call('ZSCORE', k_queue(m), ARGV[i]) then seen = seen + 1 end
  end
  if not found or q_rank(m, last, scores[#scores], share_of(k_job(last))) ~= seen then return {} end
end
local out = {}
local t = now()
for n, id in ipairs(ids) do
  local jk = k_job(id)
  q_take(m, id, scores[n], redis.call('HGET', jk, 'vec') or '', share_of(jk), true)
  if redis.call('EXISTS', jk) == 1 then
    redis.call('HINCRBY', jk, 'attempt', 1)
    redis.call('HSET', jk, 'status', '"running"', 'worker', worker, 'started_at', ts(t))
    redis.call('ZADD', k_running(m), ts(t + lease), id)
    event(id, m, 'change')
    out[#out + 1] = redis.call('HGETALL', jk)
  end
end
return out
