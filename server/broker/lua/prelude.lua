-- Shared by every script; the key functions (from server/broker/keys.py) and WIDTH
-- (server/features.py) are generated in place of the @keys line.
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
-- @keys: the key functions (k_<name>) and constants (K_<NAME>) of keys.KEYS, and WIDTH, go here
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

local function model_of(jk)
  return cjson.decode(redis.call('HGET', jk, 'model'))
end

local function level_of(jk)
  return tonumber(redis.call('HGET', jk, 'priority')) + SHIFT
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

-- a job that ended (finish, cancel, reap): into ``done`` and its owner's
-- (keys.owner_done: '' for none), and its quota released (quota_release).  Both
-- sets lose, first, the ids that ended more than ``ttl`` seconds ago (their records
-- have expired), and the owner's expires with its newest record: neither grows with
-- the jobs of owners who never list them
local function into_done(jk, id, t, ttl)
  local expired = ts(t - tonumber(ttl))
  redis.call('ZREMRANGEBYSCORE', K_DONE, '-inf', '(' .. expired)
  redis.call('ZADD', K_DONE, ts(t), id)
  local owner = redis.call('HGET', jk, 'owner')
  owner = (owner and owner ~= 'null') and cjson.decode(owner) or ''
  redis.call('ZREMRANGEBYSCORE', k_owner_done(owner), '-inf', '(' .. expired)
  redis.call('ZADD', k_owner_done(owner), ts(t), id)
  redis.call('EXPIRE', k_owner_done(owner), ttl)
  quota_release(jk, id)
end
