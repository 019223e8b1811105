-- Shared by every script; the key functions are generated from server/broker/keys.py (@keys).
-- ``vec`` is a job's forecast vector as ``entry=value;...`` (its non-zero entries,
-- values as Python's repr): values go to HINCRBYFLOAT as text, negated as text, so
-- nothing is rounded by Lua.
local P = ARGV[1]
local MAXLEN = ARGV[2]
local TWO32 = 4294967296
local HALF = 2147483648
local SHIFT = 1048576
local FINISHED = {['"done"'] = true, ['"error"'] = true, ['"cancelled"'] = true}

local function int(x) return string.format('%.0f', x) end
-- @keys: the key functions (k_<name>) and constants (K_<NAME>) of keys.KEYS go here
local FOR_WORKERS = {submit = true, cancel = true, command = true}

local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function ts(x) return string.format('%.6f', x) end

-- an admin paused model m's queue, or every queue ('*'): claims take nothing
local function paused(m)
  return redis.call('SISMEMBER', K_PAUSED, m) == 1 or redis.call('SISMEMBER', K_PAUSED, '*') == 1
end

local function event(id, m, kind)
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', MAXLEN, '*', 'job', id, 'model', m, 'kind', kind)
  if FOR_WORKERS[kind] then  -- workers follow only these: no wake-up per step of every job
    redis.call('XADD', K_WORKER_EVENTS, 'MAXLEN', '~', MAXLEN, '*', 'job', id, 'model', m, 'kind', kind)
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
  local key, pk = k_fenwick(m, level), k_popped(m, level)
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
    pos = HALF - redis.call('HINCRBY', k_counters(m), 'h' .. int(level), 1)
  else
    pos = HALF + redis.call('HINCRBY', k_counters(m), 't' .. int(level), 1) - 1
  end
  redis.call('ZADD', k_queue(m), int(level * TWO32 + pos), id)
  redis.call('ZADD', k_levels(m), int(level), int(level))
  fen_add(k_fenwick(m, level), pos, vec, 1)
end

-- take a waiting job (its score known) out of the queue and the sums; ``head``:
-- it is the first of its level (a claim), so it joins the popped sums instead
local function q_take(m, id, score, vec, head)
  local level = math.floor(score / TWO32)
  local pos = score - level * TWO32
  redis.call('ZREM', k_queue(m), id)
  local lo = int(level * TWO32)
  local hi = '(' .. int((level + 1) * TWO32)
  if redis.call('ZCOUNT', k_queue(m), lo, hi) == 0 then
    redis.call('DEL', k_fenwick(m, level), k_popped(m, level))
    redis.call('ZREM', k_levels(m), int(level))
    redis.call('HDEL', k_counters(m), 'h' .. int(level), 't' .. int(level))
  elseif head then
    local key = k_fenwick(m, level)
    for e, v in string.gmatch(vec, '(%d+)=([^;]+)') do redis.call('HINCRBYFLOAT', key, 'p:' .. e, v) end
    redis.call('RPUSH', k_popped(m, level), int(pos) .. '|' .. vec)
  else
    fen_add(k_fenwick(m, level), pos, vec, -1)
  end
end

-- take a job out of the queue if it waits there; true if it did
local function q_remove(m, id, vec)
  local s = redis.call('ZSCORE', k_queue(m), id)
  if not s then return false end
  q_take(m, id, tonumber(s), vec, false)
  return true
end

-- a job that ended: into ``done`` and its owner's (keys.owner_done: '' for none)
local function into_done(jk, id, t)
  redis.call('ZADD', K_DONE, ts(t), id)
  local owner = redis.call('HGET', jk, 'owner')
  owner = (owner and owner ~= 'null') and cjson.decode(owner) or ''
  redis.call('ZADD', k_owner_done(owner), ts(t), id)
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
  for k = 0, n - 1 do redis.call('DEL', k_blob('prev:' .. id .. ':' .. k)) end
  redis.call('DEL', k_blob('prev:' .. id .. ':live'))
  redis.call('HSET', jk, 'previews', '0', 'preview_seq', '0', 'preview_step', '0')
end

local function set_pairs(jk, first)
  for i = first, #ARGV, 2 do redis.call('HSET', jk, ARGV[i], ARGV[i + 1]) end
end

-- a job has ended (finish, cancel, reap): out of its owner's unfinished jobs
-- (held:{owner}), and its GPU-second booking, if it has one, becomes what it measured
-- (its worker_seconds, else finished_at - started_at, else 0); submit.lua books both
local function quota_release(jk, id)
  local owner = redis.call('HGET', jk, 'owner')
  if not owner or owner == 'null' then return end
  owner = cjson.decode(owner)
  redis.call('SREM', k_held(owner), id)
  local lk = k_ledger(owner)
  local raw = redis.call('HGET', lk, id)
  if not raw then return end
  local used = tonumber(redis.call('HGET', jk, 'worker_seconds') or '')
  if not used then
    local s = tonumber(redis.call('HGET', jk, 'started_at') or '')
    local f = tonumber(redis.call('HGET', jk, 'finished_at') or '')
    used = (s and f) and math.max(0, f - s) or 0
  end
  redis.call('HSET', lk, id, '[' .. string.match(raw, '^%[([^,]+),') .. ',' .. ts(used) .. ',false]')
end
