"""The Redis broker's Lua scripts: every change that touches more than one key.

Each script starts with ``PRELUDE`` and takes ``ARGV[1]`` = key prefix and
``ARGV[2]`` = the events stream's ``MAXLEN ~``; its own arguments follow from
``ARGV[3]``.  Keys are built inside the scripts from the prefix (one primary, no
cluster: see SCALEOUT.md), with the names of ``keys.py``.

Record values are JSON (one per ``JobRecord`` field); the scripts write JSON
texts (``'"running"'``, ``'null'``, numbers as their text) and decode at most a
single field (``model``, ``inputs``), never the whole record.

Queue: ``q:{m}`` scores are ``level * 2^32 + position``; within a level new jobs
take tail positions counting up from 2^31 and re-runs head positions counting
down from 2^31 - 1.  Each level keeps a sparse Fenwick tree over the 2^32
positions (``fen:{m}:{level}``, fields ``node:entry`` for the non-zero entries of
the job vectors) and its totals (``t:entry``): a push or a removal is 32 node
updates, a prefix 32 node reads.  A claim takes the head of a level, which is
cheaper: its vector is added to the level's popped sums (``p:entry``) and listed
in ``pop:{m}:{level}``, and stays in the tree; every popped position is before
every waiting one, so the sum ahead of a job is its prefix minus the popped sums
(and a level's waiting total, its totals minus them).  A re-run pushed at the head
would break that order, so it first takes the listed popped vectors out of the
tree for real.  A level that empties is deleted (which also drops float drift),
like the in-memory queue's.
"""

from __future__ import annotations

# Shared helpers.  ``vec`` is a job's forecast vector as ``entry=value;...`` (its
# non-zero entries, values as Python's repr): values go to HINCRBYFLOAT as text,
# negated as text, so nothing is rounded by Lua.
PRELUDE = r"""
local P = ARGV[1]
local MAXLEN = ARGV[2]
local TWO32 = 4294967296
local HALF = 2147483648
local SHIFT = 1048576
local FINISHED = {['"done"'] = true, ['"error"'] = true, ['"cancelled"'] = true}

local function int(x) return string.format('%.0f', x) end
local function k_job(id) return P .. 'job:' .. id end
local function k_q(m) return P .. 'q:' .. m end
local function k_lv(m) return P .. 'lv:' .. m end
local function k_seq(m) return P .. 'seq:' .. m end
local function k_fen(m, l) return P .. 'fen:' .. m .. ':' .. int(l) end
local function k_pop(m, l) return P .. 'pop:' .. m .. ':' .. int(l) end
local function k_run(m) return P .. 'run:' .. m end
local function k_wk(m) return P .. 'wk:' .. m end
local function k_wki(m) return P .. 'wki:' .. m end
local K_MODELS = P .. 'models'
local K_DONE = P .. 'done'
local K_EV = P .. 'ev'
local K_WEV = P .. 'wev'
local K_OUTBOX = P .. 'outbox'
local FOR_WORKERS = {submit = true, cancel = true, command = true}

local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function ts(x) return string.format('%.6f', x) end

local function event(id, m, kind)
  redis.call('XADD', K_EV, 'MAXLEN', '~', MAXLEN, '*', 'job', id, 'model', m, 'kind', kind)
  if FOR_WORKERS[kind] then  -- workers follow only these: no wake-up per step of every job
    redis.call('XADD', K_WEV, 'MAXLEN', '~', MAXLEN, '*', 'job', id, 'model', m, 'kind', kind)
  end
end

local function lowbit(i)
  local p = 1
  while i % (p * 2) == 0 do p = p * 2 end
  return p
end

local function neg(v)
  if string.sub(v, 1, 1) == '-' then return string.sub(v, 2) end
  return '-' .. v
end

-- add (sign 1) or subtract (sign -1) vec at position pos of a level's tree
local function fen_add(key, pos, vec, sign)
  for e, v in string.gmatch(vec, '(%d+)=([^;]+)') do
    if sign < 0 then v = neg(v) else redis.call('HSET', key, 'u:' .. e, 1) end  -- u: the entries the level uses
    redis.call('HINCRBYFLOAT', key, 't:' .. e, v)
    local i = pos + 1
    while i <= TWO32 do
      redis.call('HINCRBYFLOAT', key, int(i) .. ':' .. e, v)
      i = i + lowbit(i)
    end
  end
end

local function model_of(jk)
  return cjson.decode(redis.call('HGET', jk, 'model'))
end

local function level_of(jk)
  return tonumber(redis.call('HGET', jk, 'priority')) + SHIFT
end

-- the level's popped heads out of the tree for real (before a push at the head)
local function flush_popped(m, level)
  local key, pk = k_fen(m, level), k_pop(m, level)
  local popped = redis.call('LRANGE', pk, 0, -1)
  if #popped == 0 then return end
  for _, item in ipairs(popped) do
    local pos, vec = string.match(item, '^(%d+)|(.*)$')
    fen_add(key, tonumber(pos), vec, -1)
    for e in string.gmatch(vec, '(%d+)=') do redis.call('HDEL', key, 'p:' .. e) end
  end
  redis.call('DEL', pk)
end

-- queue a job at the tail (arrival) or the head (re-run) of its level
local function q_push(m, id, level, head, vec)
  local pos
  if head then
    flush_popped(m, level)
    pos = HALF - redis.call('HINCRBY', k_seq(m), 'h' .. int(level), 1)
  else
    pos = HALF + redis.call('HINCRBY', k_seq(m), 't' .. int(level), 1) - 1
  end
  redis.call('ZADD', k_q(m), int(level * TWO32 + pos), id)
  redis.call('ZADD', k_lv(m), int(level), int(level))
  fen_add(k_fen(m, level), pos, vec, 1)
end

-- take a waiting job (its score known) out of the queue and the sums; ``head``:
-- it is the first of its level (a claim), so it joins the popped sums instead
local function q_take(m, id, score, vec, head)
  local level = math.floor(score / TWO32)
  local pos = score - level * TWO32
  redis.call('ZREM', k_q(m), id)
  local lo = int(level * TWO32)
  local hi = '(' .. int((level + 1) * TWO32)
  if redis.call('ZCOUNT', k_q(m), lo, hi) == 0 then
    redis.call('DEL', k_fen(m, level), k_pop(m, level))
    redis.call('ZREM', k_lv(m), int(level))
    redis.call('HDEL', k_seq(m), 'h' .. int(level), 't' .. int(level))
  elseif head then
    local key = k_fen(m, level)
    for e, v in string.gmatch(vec, '(%d+)=([^;]+)') do redis.call('HINCRBYFLOAT', key, 'p:' .. e, v) end
    redis.call('RPUSH', k_pop(m, level), int(pos) .. '|' .. vec)
  else
    fen_add(k_fen(m, level), pos, vec, -1)
  end
end

-- take a job out of the queue if it waits there; true if it did
local function q_remove(m, id, vec)
  local s = redis.call('ZSCORE', k_q(m), id)
  if not s then return false end
  q_take(m, id, tonumber(s), vec, false)
  return true
end

-- the job's inputs and the record itself expire with the result TTL
local function expire_job(jk, ttl)
  redis.call('EXPIRE', jk, ttl)
  local inputs = redis.call('HGET', jk, 'inputs')
  if inputs then
    for _, key in ipairs(cjson.decode(inputs)) do redis.call('EXPIRE', P .. key, ttl) end
  end
end

-- a job that has just ended with a delivery to make (its webhook, or the uploads of
-- a done job) joins the outbox, due now: any node's drainer delivers it
local function to_outbox(jk, id, t)
  local uploads = redis.call('HGET', jk, 'upload_urls')
  if redis.call('HGET', jk, 'webhook') == '"pending"'
      or (uploads and uploads ~= 'null' and redis.call('HGET', jk, 'status') == '"done"') then
    redis.call('ZADD', K_OUTBOX, 'NX', ts(t), id)
  end
end

-- a lost attempt's previews go with it (its re-run makes its own)
local function drop_previews(jk, id)
  local n = tonumber(redis.call('HGET', jk, 'previews') or '0') or 0
  for k = 0, n - 1 do redis.call('DEL', P .. 'prev:' .. id .. ':' .. k) end
  redis.call('DEL', P .. 'prev:' .. id .. ':live')
  redis.call('HSET', jk, 'previews', '0', 'preview_seq', '0', 'preview_step', '0')
end

local function set_pairs(jk, first)
  for i = first, #ARGV, 2 do redis.call('HSET', jk, ARGV[i], ARGV[i + 1]) end
end
"""

# submit: ARGV[3] id, [4] model, [5] level, [6] vec, [7] capacity, [8] task,
# [9] created_at ('' = Redis TIME), [10] valid until (Redis TIME; '' = always),
# [11] idempotency key ('' = none; without the prefix), [12] its value
# ``job_id fingerprint``, [13] its TTL (whole seconds), [14] number of input blobs,
# then (key, bytes) per blob, then field/JSON pairs of the record.
# Returns {seq, created_at} when queued (or when the id exists already: a retried
# submit); {-1, depth} when the queue is full; {-2, value} when the key is bound to
# a job that exists (nothing queued); {-3, 0} when it runs after ``valid until``
# (its sender has given up on the answer: nothing is written).  The key is bound in
# the same step that queues the job, so a key never names a job that does not exist.
SUBMIT = PRELUDE + r"""
local id, m, level, vec, cap = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
if ARGV[10] ~= '' and now() > tonumber(ARGV[10]) then return {-3, 0} end
local jk = k_job(id)
if redis.call('EXISTS', jk) == 1 then  -- a retried submit: it stands as it is
  return {tonumber(redis.call('HGET', jk, 'seq')), redis.call('HGET', jk, 'created_at')}
end
local ik = ''
if ARGV[11] ~= '' then
  ik = P .. 'idem:' .. ARGV[11]
  local held = redis.call('GET', ik)
  if held and redis.call('EXISTS', k_job(string.match(held, '^(%S+)'))) == 1 then return {-2, held} end
end
local depth = redis.call('ZCARD', k_q(m))
if depth >= cap then return {-1, depth} end
local seq = redis.call('INCR', P .. 'seq')
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
redis.call('SADD', P .. 'task:' .. ARGV[8], id)
redis.call('SADD', K_MODELS, m)
q_push(m, id, level, false, vec)
event(id, m, 'submit')
return {seq, t}
"""

# claim: ARGV[3] model, [4] worker (JSON), [5] lease seconds, [6] valid until
# (Redis TIME; '' = always).  Pops the head of the queue: attempt + 1, running on
# the worker from Redis TIME, into run:{m} with the lease deadline.  Returns the
# record's HGETALL, or false (also when it runs after ``valid until``: a claim whose
# sender gave up waiting takes nothing, or the job would run nowhere until its lease
# expired and count as lost).
CLAIM = PRELUDE + r"""
local m, worker, lease = ARGV[3], ARGV[4], tonumber(ARGV[5])
if ARGV[6] and ARGV[6] ~= '' and now() > tonumber(ARGV[6]) then return false end
for _ = 1, 16 do
  local top = redis.call('ZRANGE', k_q(m), 0, 0, 'WITHSCORES')
  if #top == 0 then return false end
  local id = top[1]
  local jk = k_job(id)
  local vec = redis.call('HGET', jk, 'vec') or ''
  q_take(m, id, tonumber(top[2]), vec, true)
  if redis.call('EXISTS', jk) == 1 then
    local t = now()
    redis.call('HINCRBY', jk, 'attempt', 1)
    redis.call('HSET', jk, 'status', '"running"', 'worker', worker, 'started_at', ts(t))
    redis.call('ZADD', k_run(m), ts(t + lease), id)
    event(id, m, 'change')
    return redis.call('HGETALL', jk)
  end
end
return false
"""

# standing (read only): ARGV[3] model, [4] job id or '', [5] WIDTH.  Returns
# {running records (HGETALL each), per level ahead its totals then its popped sums
# (HMGET t:0.., p:0..), for the job's own level {the entries it uses (``u:entry``),
# HMGET of their popped sums then their Fenwick prefix nodes} (the caller subtracts
# and sums), 1 if the job waits (or no job was named) else 0}.
STANDING = PRELUDE + r"""
local m, id, width, newlevel = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local running = {}
for _, rid in ipairs(redis.call('ZRANGE', k_run(m), 0, -1)) do
  running[#running + 1] = redis.call('HGETALL', k_job(rid))
end
local level, pos
if id ~= '' then
  local s = redis.call('ZSCORE', k_q(m), id)
  if s then
    s = tonumber(s)
    level = math.floor(s / TWO32)
    pos = s - level * TWO32
  elseif not newlevel or newlevel == '' then
    return {running, {}, {}, 0}
  end
end
local levels
if level then
  levels = redis.call('ZRANGEBYSCORE', k_lv(m), '-inf', '(' .. int(level))
elseif newlevel and newlevel ~= '' then  -- a job not queued: what it would queue behind
  levels = redis.call('ZRANGEBYSCORE', k_lv(m), '-inf', newlevel)
else
  levels = redis.call('ZRANGE', k_lv(m), 0, -1)
end
local tf, pf = {}, {}
for e = 0, width - 1 do tf[#tf + 1] = 't:' .. e end
for e = 0, width - 1 do tf[#tf + 1] = 'p:' .. e; pf[#pf + 1] = 'p:' .. e end
local totals = {}  -- per level: its totals, then its popped sums
for _, l in ipairs(levels) do totals[#totals + 1] = redis.call('HMGET', k_fen(m, tonumber(l)), unpack(tf)) end
local prefix = {}  -- the entries the job's level uses, then their popped sums and prefix nodes
if pos then
  local key = k_fen(m, level)
  local uf = {}
  for e = 0, width - 1 do uf[#uf + 1] = 'u:' .. e end
  local used = {}
  for e, u in ipairs(redis.call('HMGET', key, unpack(uf))) do
    if u then used[#used + 1] = e - 1 end
  end
  if #used > 0 then
    local f = {}
    for _, e in ipairs(used) do f[#f + 1] = 'p:' .. e end
    local i = pos
    while i > 0 do
      for _, e in ipairs(used) do f[#f + 1] = int(i) .. ':' .. e end
      i = i - lowbit(i)
    end
    prefix = {used, redis.call('HMGET', key, unpack(f))}
  end
end
return {running, totals, prefix, 1}
"""

# update: ARGV[3] id, [4] attempt or '', [5] event kind (change/progress), then
# field/JSON pairs.  Refused (0) for an unknown job, or with an attempt that is
# not the current one or a job that no longer runs (stricter than "not finished":
# a lease that expired put it back in the queue).  Returns 1 when applied.
UPDATE = PRELUDE + r"""
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
"""

# finish: ARGV[3] id, [4] attempt or '', [5] status JSON, [6] result TTL (whole
# seconds), [7] number of result blobs, then (key, bytes) per blob, then field/JSON
# pairs.  Refused (false) for an unknown or finished job, or with an attempt that is
# stale or whose job no longer runs (requeued): then nothing is written, the blobs
# included (a fenced attempt's images never become the job's).  Else stores the
# blobs (with the TTL), sets the fields, status and finished_at (Redis TIME), takes
# the job out of run:{m} and q:{m} (and the sums), into ``done``, sets the TTL of
# the record and its inputs; returns finished_at.
FINISH = PRELUDE + r"""
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
redis.call('ZREM', k_run(m), id)
q_remove(m, id, redis.call('HGET', jk, 'vec') or '')
redis.call('ZADD', K_DONE, ts(t), id)
expire_job(jk, ttl)
to_outbox(jk, id, t)
event(id, m, 'change')
return ts(t)
"""

# release: ARGV[3] id, [4] attempt.  A running job of that attempt goes back to
# the head of its priority, its ``lost`` count untouched.  Returns 1 or 0.
RELEASE = PRELUDE + r"""
local id, attempt = ARGV[3], ARGV[4]
local jk = k_job(id)
if redis.call('EXISTS', jk) == 0 then return 0 end
if redis.call('HGET', jk, 'attempt') ~= attempt then return 0 end
if redis.call('HGET', jk, 'status') ~= '"running"' then return 0 end
local m = model_of(jk)
redis.call('ZREM', k_run(m), id)
redis.call('HSET', jk, 'status', '"waiting"', 'worker', 'null', 'step', '0', 'first_step_at', 'null', 'last_step_at', 'null')
drop_previews(jk, id)
q_push(m, id, level_of(jk), true, redis.call('HGET', jk, 'vec') or '')
event(id, m, 'change')
return 1
"""

# cancel: ARGV[3] id, [4] message JSON, [5] result TTL.  Waiting: out of the
# queue and the sums, ``cancelled`` now, into ``done``.  Running: the cancel flag
# and a ``cancel`` event.  Returns {status before (JSON), HGETALL} or false.
CANCEL = PRELUDE + r"""
local id, message, ttl = ARGV[3], ARGV[4], ARGV[5]
local jk = k_job(id)
if redis.call('EXISTS', jk) == 0 then return false end
local status = redis.call('HGET', jk, 'status')
local m = model_of(jk)
if status == '"waiting"' then
  local t = now()
  q_remove(m, id, redis.call('HGET', jk, 'vec') or '')
  redis.call('HSET', jk, 'status', '"cancelled"', 'message', message, 'finished_at', ts(t))
  redis.call('ZADD', K_DONE, ts(t), id)
  expire_job(jk, ttl)
  to_outbox(jk, id, t)
  event(id, m, 'change')
elseif status == '"running"' then
  redis.call('HSET', jk, 'cancel', '1')
  event(id, m, 'cancel')
end
return {status, redis.call('HGETALL', jk)}
"""

# put_attempt_blob: ARGV[3] id, [4] attempt, [5] blob key, [6] bytes, [7] TTL.
# Stores the blob (a preview) only while that attempt is the job's current one and
# it runs: a worker that lost its lease writes nothing.  Returns 1 or 0.
PUT_ATTEMPT_BLOB = PRELUDE + r"""
local jk = k_job(ARGV[3])
if redis.call('HGET', jk, 'attempt') ~= ARGV[4] or redis.call('HGET', jk, 'status') ~= '"running"' then return 0 end
redis.call('SET', P .. ARGV[5], ARGV[6], 'EX', ARGV[7])
return 1
"""

# heartbeat: ARGV[3] lease, [4] number of infos, then (model, worker, info JSON)
# per info, then (job id, attempt) per running job.  Presence deadlines from Redis
# TIME; leases of current attempts extended.  Returns {Redis TIME, ids to stop}.
HEARTBEAT = PRELUDE + r"""
local lease, n = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = now()
local i = 5
for _ = 1, n do
  local m, w, info = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  redis.call('ZADD', k_wk(m), ts(t + lease), w)
  redis.call('HSET', k_wki(m), w, info)
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
    if redis.call('ZSCORE', k_run(m), id) then
      redis.call('ZADD', k_run(m), 'XX', ts(t + lease), id)
      ok = redis.call('HGET', jk, 'cancel') ~= '1'
    end
  end
  if not ok then stop[#stop + 1] = id end
end
return {ts(t), stop}
"""

# reap: ARGV[3] result TTL, [4] the "lost twice" message JSON, [5] batch size.
# Expired leases of every model: lost once -> back at the head of the priority,
# twice -> ``error``.  Expired presence goes.  Returns {Redis TIME, jobs handled}.
REAP = PRELUDE + r"""
local ttl, message, batch = ARGV[3], ARGV[4], tonumber(ARGV[5])
local t = now()
local handled = 0
for _, m in ipairs(redis.call('SMEMBERS', K_MODELS)) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', k_run(m), '-inf', ts(t), 'LIMIT', 0, batch)) do
    redis.call('ZREM', k_run(m), id)
    local jk = k_job(id)
    if redis.call('EXISTS', jk) == 1 and redis.call('HGET', jk, 'status') == '"running"' then
      handled = handled + 1
      if tonumber(redis.call('HGET', jk, 'lost') or '0') == 0 then
        redis.call('HSET', jk, 'lost', '1', 'status', '"waiting"', 'worker', 'null', 'step', '0',
          'first_step_at', 'null', 'last_step_at', 'null')
        drop_previews(jk, id)
        q_push(m, id, level_of(jk), true, redis.call('HGET', jk, 'vec') or '')
      else
        redis.call('HINCRBY', jk, 'lost', 1)
        redis.call('HSET', jk, 'status', '"error"', 'message', message, 'finished_at', ts(t))
        redis.call('ZADD', K_DONE, ts(t), id)
        expire_job(jk, ttl)
        to_outbox(jk, id, t)
      end
      event(id, m, 'change')
    end
  end
  local gone = redis.call('ZRANGEBYSCORE', k_wk(m), '-inf', ts(t), 'LIMIT', 0, batch)
  for _, w in ipairs(gone) do
    redis.call('ZREM', k_wk(m), w)
    redis.call('HDEL', k_wki(m), w)
  end
end
return {ts(t), handled}
"""

# claim_deliveries: ARGV[3] job id ('' = any), [4] lease seconds, [5] how many.
# Due outbox entries (that one, or the first ``how many``) become due again only
# after the lease (a drainer that dies mid-delivery leaves them to another).
# Returns their ids.
CLAIM_DELIVERIES = PRELUDE + r"""
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
"""

# end_delivery: ARGV[3] job id, [4] retry in seconds ('' = delivered or given up:
# out of the outbox), then field/JSON pairs set on the record (the outcomes), with
# a change event, when it still exists.
END_DELIVERY = PRELUDE + r"""
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
"""

# observe_cost: ARGV[3] model, [4] fit, [5] forget, [6] len(decayed), then the
# decayed values, then the added ones.  cost4:{m}[fit] (a JSON list, missing =
# zeros) becomes forget*old + decayed for the first part, old + added for the
# rest; written with 17 significant digits (exact doubles).
OBSERVE_COST = PRELUDE + r"""
local key = P .. 'cost4:' .. ARGV[3]  -- keys.cost
local task, forget, nd = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local raw = redis.call('HGET', key, task)
local old = {}
if raw then old = cjson.decode(raw) end
local out = {}
local j = 0
for i = 7, #ARGV do
  j = j + 1
  local o = tonumber(old[j]) or 0
  local v = tonumber(ARGV[i])
  local x
  if j <= nd then x = forget * o + v else x = o + v end
  out[j] = string.format('%.17g', x)
end
redis.call('HSET', key, task, '[' .. table.concat(out, ',') .. ']')
return 1
"""

SCRIPTS: dict[str, str] = {
    "submit": SUBMIT,
    "claim": CLAIM,
    "standing": STANDING,
    "update": UPDATE,
    "finish": FINISH,
    "release": RELEASE,
    "cancel": CANCEL,
    "put_attempt_blob": PUT_ATTEMPT_BLOB,
    "heartbeat": HEARTBEAT,
    "reap": REAP,
    "observe_cost": OBSERVE_COST,
    "claim_deliveries": CLAIM_DELIVERIES,
    "end_delivery": END_DELIVERY,
}
