-- submit: ARGV[3] id, [4] model, [5] level, [6] vec, [7] capacity, [8] task,
-- [9] created_at ('' = Redis TIME), [10] valid until (Redis TIME; '' = always),
-- [11] idempotency key ('' = none; without the prefix), [12] its value
-- ``job_id fingerprint``, [13] its TTL (whole seconds), [14] the owner's admission
-- ('' = none; else JSON base.Admission), [15] number of input blobs, then (key, bytes)
-- per blob, then field/JSON pairs of the record.
-- Returns {seq, created_at} when queued (or when the id exists already: a retried
-- submit); {-1, depth} when the queue is full; {-2, value} when the key is bound to
-- a job that exists (nothing queued); {-3, 0} when it runs after ``valid until``
-- (its sender has given up on the answer: nothing is written); {-4, count, ids...}
-- or {-5, used, wait} when the admission refuses (see admit).  The key is bound in
-- the same step that queues the job, so a key never names a job that does not exist.

-- admission (server/quotas.py): the owner's unfinished jobs (held:{owner}) and its
-- GPU-seconds booked within the window (use:{owner}: job -> [at, seconds, open]; an
-- open booking counts until its job ends), checked and booked in this one step.
-- admit_refusal returns nil (it fits) or the refusal: {-4, unfinished count, their
-- ids...} over max_queued; {-5, used, seconds until enough ages out} over the budget.
local function admit_refusal(a, t)
  local hk = k_held(a.owner)
  if a.max_queued and redis.call('SCARD', hk) >= a.max_queued then
    for _, held in ipairs(redis.call('SMEMBERS', hk)) do  -- a job that ended unseen (expired) goes
      local s = redis.call('HGET', k_job(held), 'status')
      if not s then redis.call('SREM', hk, held) elseif FINISHED[s] then quota_release(k_job(held), held) end
    end
    local ids = redis.call('SMEMBERS', hk)
    if #ids >= a.max_queued then return {-4, #ids, unpack(ids)} end
  end
  if not a.budget then return nil end
  local lk, used, settled = k_ledger(a.owner), 0, {}
  local raw = redis.call('HGETALL', lk)
  for i = 1, #raw, 2 do
    local e = cjson.decode(raw[i + 1])
    if e[3] or e[1] > t - a.window then
      used = used + e[2]
      if not e[3] then table.insert(settled, e) end
    else
      redis.call('HDEL', lk, raw[i])  -- settled and out of the window
    end
  end
  if used + a.cost <= a.budget then return nil end
  table.sort(settled, function(x, y) return x[1] < y[1] end)
  local over, wait = used + a.cost - a.budget, a.window
  for _, e in ipairs(settled) do
    over = over - e[2]
    if over <= 0 then wait = math.max(0, e[1] + a.window - t); break end
  end
  return {-5, tostring(used), tostring(wait)}
end

-- ``admission``: ARGV[14]; nil when admitted (then ``id`` is booked: unfinished, and
-- at its cost with a budget), else the refusal
local function admit(admission, id)
  if admission == '' then return nil end
  local a, t = cjson.decode(admission), now()
  local refused = admit_refusal(a, t)
  if refused then return refused end
  redis.call('SADD', k_held(a.owner), id)
  if a.budget then redis.call('HSET', k_ledger(a.owner), id, '[' .. ts(t) .. ',' .. tostring(a.cost) .. ',true]') end
  return nil
end

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
local refused = admit(ARGV[14], id)  -- nothing below refuses: the job is queued
if refused then return refused end
local seq = redis.call('INCR', K_SEQ)
local t = ARGV[9]
if t == '' then t = ts(now()) end
local i = 16
for _ = 1, tonumber(ARGV[15]) do
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
