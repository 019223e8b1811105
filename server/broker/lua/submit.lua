-- submit: ARGV[3] id, [4] model, [5] level, [6] vec, [7] capacity, [8] task,
-- [9] created_at ('' = Redis TIME), [10] valid until (Redis TIME; '' = always),
-- [11] idempotency key ('' = none; without the prefix), [12] its value
-- ``job_id fingerprint``, [13] its TTL (whole seconds), [14] number of input blobs,
-- then (key, bytes) per blob, then field/JSON pairs of the record.
-- Returns {seq, created_at} when queued (or when the id exists already: a retried
-- submit); {-1, depth} when the queue is full; {-2, value} when the key is bound to
-- a job that exists (nothing queued); {-3, 0} when it runs after ``valid until``
-- (its sender has given up on the answer: nothing is written).  The key is bound in
-- the same step that queues the job, so a key never names a job that does not exist.
local id, m, level, vec, cap = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
if ARGV[10] ~= '' and now() > tonumber(ARGV[10]) then return {-3, 0} end
local jk = k_job(id)
if redis.call('EXISTS', jk) == 1 then  -- a retried submit: it stands as it is
  return {tonumber(redis.call('HGET', jk, 'seq')), redis.call('HGET', jk, 'created_at')}
end
local ik = ''
if ARGV[11] ~= '' then
  ik = k_submit(ARGV[11])
  local held = redis.call('GET', ik)
  if held and redis.call('EXISTS', k_job(string.match(held, '^(%S+)'))) == 1 then return {-2, held} end
end
local depth = redis.call('ZCARD', k_queue(m))
if depth >= cap then return {-1, depth} end
local seq = redis.call('INCR', K_SEQ)
local t = ARGV[9]
if t == '' then t = ts(now()) end
local i = 15
for _ = 1, tonumber(ARGV[14]) do
  redis.call('SET', P .. ARGV[i], ARGV[i + 1])
  i = i + 2
end
set_pairs(jk, i)
redis.call('HSET', jk, 'seq', seq, 'created_at', t, 'status', '"waiting"', 'vec', vec, 'cancel', '0')
if ik ~= '' then redis.call('SET', ik, ARGV[12], 'EX', ARGV[13]) end
redis.call('SADD', k_task(ARGV[8]), id)
redis.call('SADD', K_MODELS, m)
q_push(m, id, level, false, vec, share_of(jk), stride_of(jk))
event(id, m, 'submit')
return {seq, t}
