-- The queue's shared functions (after prelude.lua, before every script): levels,
-- fair-share lanes and their turns, the Fenwick sums.  The rule is server/queue.py's:
-- within a level every fair-share key (``share``) has a lane (``ln:{m}:{level}:{share}``,
-- job -> position), and the lanes take turns by virtual time; ``rr:{m}:{level}``
-- holds the level's ``clock`` (the tag of the last head taken), ``opened`` (lanes
-- opened so far) and per lane ``b:share`` (base), ``s:share`` (stride), ``o:share``
-- (the order it opened in).  A lane's n-th job has the tag base + n * stride; the
-- head is the lowest tag, ties to the lane opened first.
local STRIDE = 720720

local function lowbit(i)
  local p = 1
  while i % (p * 2) == 0 do p = p * 2 end
  return p
end

local function neg(v)
  if string.sub(v, 1, 1) == '-' then return string.sub(v, 2) end
  return '-' .. v
end

-- the highest node an update of tree index i must reach: no prefix read goes
-- above the lane's last position.  A head position's climb ends at HALF (which
-- every prefix of a tail position reads); a tail position's at HALF + the tree's
-- tail capacity ``c`` (a power of two, 0 before the first tail position), doubled
-- as the lane grows: the node HALF + 2c then gets node HALF + c (every tail entry
-- so far; nothing climbed above it).  A tree without ``c`` was made by a version
-- that climbed to 2^32 for every update, and goes on so (a lane's tree is deleted
-- when it empties).
local function fen_top(key, i)
  local c = redis.call('HGET', key, 'c')
  if not c then
    if redis.call('EXISTS', key) == 1 then return TWO32 end
    c = 0
    redis.call('HSET', key, 'c', 0)
  end
  if i <= HALF then return HALF end
  c = tonumber(c)
  local x = i - HALF
  if x > c then
    local used = {}
    if c > 0 then
      local f = {}
      for e = 0, WIDTH - 1 do f[#f + 1] = 'u:' .. e end
      for e, u in ipairs(redis.call('HMGET', key, unpack(f))) do
        if u then used[#used + 1] = e - 1 end
      end
    else
      c = 1
    end
    while c < x do
      for _, e in ipairs(used) do
        local v = redis.call('HGET', key, int(HALF + c) .. ':' .. e)
        if v then redis.call('HINCRBYFLOAT', key, int(HALF + 2 * c) .. ':' .. e, v) end
      end
      c = 2 * c
    end
    redis.call('HSET', key, 'c', int(c))
  end
  return HALF + c
end

-- add (sign 1) or subtract (sign -1) vec at position pos of a lane's tree
local function fen_add(key, pos, vec, sign)
  local top = fen_top(key, pos + 1)
  for e, v in string.gmatch(vec, '(%d+)=([^;]+)') do
    if sign < 0 then v = neg(v) else redis.call('HSET', key, 'u:' .. e, 1) end  -- u: the entries the lane uses
    redis.call('HINCRBYFLOAT', key, 't:' .. e, v)
    local i = pos + 1
    while i <= top do
      redis.call('HINCRBYFLOAT', key, int(i) .. ':' .. e, v)
      i = i + lowbit(i)
    end
  end
end

local function share_of(jk)
  local s = redis.call('HGET', jk, 'share')
  if not s then return '' end
  return cjson.decode(s)
end

local function stride_of(jk)
  local w = tonumber(redis.call('HGET', jk, 'weight') or '1') or 1
  return math.floor(STRIDE / math.max(1, w))
end

-- the level's lanes: share -> {base, stride, since}
local function lanes_of(m, level)
  local raw = redis.call('HGETALL', k_turns(m, level))
  local lanes = {}
  for i = 1, #raw, 2 do
    local kind, share = string.sub(raw[i], 1, 2), string.sub(raw[i], 3)
    local field = ({['b:'] = 'base', ['s:'] = 'stride', ['o:'] = 'since'})[kind]
    if field then
      lanes[share] = lanes[share] or {}
      lanes[share][field] = tonumber(raw[i + 1])
    end
  end
  return lanes
end

-- the share whose lane's head runs next at the level (nil: none)
local function rr_next(lanes)
  local best, bt, bs = nil, 0, 0
  for share, l in pairs(lanes) do
    local t = l.base + l.stride
    if best == nil or t < bt or (t == bt and l.since < bs) then best, bt, bs = share, t, l.since end
  end
  return best
end

-- the job that runs next at the level, and its share (nil: none)
local function level_head(m, level)
  local share = rr_next(lanes_of(m, level))
  if share == nil then return nil end
  return redis.call('ZRANGE', k_lane(m, level, share), 0, 0)[1], share
end

-- how many jobs of lane ``l`` run before the job of tag ``tag`` of a lane opened ``since``
local function runs_before(m, level, share, l, tag, since)
  local tie = 1
  if l.since < since then tie = 0 end
  local n = math.floor((tag - l.base - tie) / l.stride)
  return math.max(0, math.min(n, redis.call('ZCARD', k_lane(m, level, share))))
end

-- the level's popped heads of a lane out of the tree for real (before a push at its head)
local function flush_popped(m, level, share)
  local key, pk = k_fenwick(m, level, share), k_popped(m, level, share)
  local popped = redis.call('LRANGE', pk, 0, -1)
  if #popped == 0 then return end
  for _, item in ipairs(popped) do
    local pos, vec = string.match(item, '^(%d+)|(.*)$')
    fen_add(key, tonumber(pos), vec, -1)
    for e in string.gmatch(vec, '(%d+)=') do redis.call('HDEL', key, 'p:' .. e) end
  end
  redis.call('DEL', pk)
end

-- queue a job at the tail (arrival) or the head (re-run, move) of its lane; a lane
-- that opens starts at the level's clock
local function q_push(m, id, level, head, vec, share, stride)
  local tk = k_turns(m, level)
  if redis.call('HEXISTS', tk, 'b:' .. share) == 0 then
    local opened = redis.call('HINCRBY', tk, 'opened', 1) - 1
    redis.call('HSET', tk, 'b:' .. share, redis.call('HGET', tk, 'clock') or '0', 's:' .. share, stride, 'o:' .. share, opened)
  end
  local lane = share .. ':' .. int(level)
  local pos
  if head then
    flush_popped(m, level, share)
    pos = HALF - redis.call('HINCRBY', k_counters(m), 'h' .. lane, 1)
  else
    pos = HALF + redis.call('HINCRBY', k_counters(m), 't' .. lane, 1) - 1
  end
  redis.call('ZADD', k_queue(m), int(level * TWO32 + pos), id)
  redis.call('ZADD', k_lane(m, level, share), int(pos), id)
  redis.call('ZADD', k_levels(m), int(level), int(level))
  fen_add(k_fenwick(m, level, share), pos, vec, 1)
end

-- a lane's turn next: its head's tag just below every other lane's head's
local function q_first(m, level, share)
  local lanes = lanes_of(m, level)
  local own, low = lanes[share], nil
  for s, l in pairs(lanes) do
    if s ~= share and (low == nil or l.base + l.stride < low) then low = l.base + l.stride end
  end
  if low ~= nil and low - 1 - own.stride < own.base then
    redis.call('HSET', k_turns(m, level), 'b:' .. share, int(low - 1 - own.stride))
  end
end

-- a running job back to the head of its priority, its lane's turn next (release, and
-- reap's first loss): the lost attempt's progress and previews go (as the memory
-- broker's ``release``)
local function requeue(m, id, jk)
  redis.call('HSET', jk, 'status', '"waiting"', 'worker', 'null', 'step', '0', 'first_step_at', 'null', 'last_step_at', 'null')
  drop_previews(jk, id)
  local level, share = level_of(jk), share_of(jk)
  q_push(m, id, level, true, redis.call('HGET', jk, 'vec') or '', share, stride_of(jk))
  q_first(m, level, share)
end

-- take a waiting job (its score known) out of the queue and the sums; ``charge``:
-- it was taken to run (its lane's turn is used; the clock moves to its tag if it
-- was the level's head).  A lane's head joins its popped sums instead of the tree.
local function q_take(m, id, score, vec, share, charge)
  local level = math.floor(score / TWO32)
  local pos = score - level * TWO32
  local tk, lane = k_turns(m, level), k_lane(m, level, share)
  if charge then
    local lanes = lanes_of(m, level)
    local l = lanes[share]
    if rr_next(lanes) == share and redis.call('ZRANGE', lane, 0, 0)[1] == id then
      redis.call('HSET', tk, 'clock', int(l.base + l.stride))
    end
    redis.call('HSET', tk, 'b:' .. share, int(l.base + l.stride))
  end
  local head = redis.call('ZRANGE', lane, 0, 0)[1] == id
  redis.call('ZREM', k_queue(m), id)
  redis.call('ZREM', lane, id)
  if redis.call('ZCARD', lane) == 0 then
    redis.call('DEL', k_fenwick(m, level, share), k_popped(m, level, share))
    redis.call('HDEL', k_counters(m), 'h' .. share .. ':' .. int(level), 't' .. share .. ':' .. int(level))
    redis.call('HDEL', tk, 'b:' .. share, 's:' .. share, 'o:' .. share)
    if redis.call('ZCOUNT', k_queue(m), int(level * TWO32), '(' .. int((level + 1) * TWO32)) == 0 then
      redis.call('ZREM', k_levels(m), int(level))
      redis.call('DEL', tk)
    end
  elseif head then
    local key = k_fenwick(m, level, share)
    for e, v in string.gmatch(vec, '(%d+)=([^;]+)') do redis.call('HINCRBYFLOAT', key, 'p:' .. e, v) end
    redis.call('RPUSH', k_popped(m, level, share), int(pos) .. '|' .. vec)
  else
    fen_add(k_fenwick(m, level, share), pos, vec, -1)
  end
end

-- take a job out of the queue if it waits there (``charge`` as q_take); true if it did
local function q_remove(m, id, jk, charge)
  local s = redis.call('ZSCORE', k_queue(m), id)
  if not s then return false end
  q_take(m, id, tonumber(s), redis.call('HGET', jk, 'vec') or '', share_of(jk), charge)
  return true
end

-- the next job of the queue (its id, score, share), or nil
local function q_head(m)
  local levels = redis.call('ZRANGE', k_levels(m), 0, 0)
  if #levels == 0 then return nil end
  local level = tonumber(levels[1])
  local id, share = level_head(m, level)
  if id == nil then  -- a level without lanes (cannot happen; never loop on it)
    redis.call('ZREM', k_levels(m), levels[1])
    return nil
  end
  return id, tonumber(redis.call('ZSCORE', k_queue(m), id)), share
end

-- the level, the lanes and the run-order count ahead of waiting job ``id`` of
-- ``share`` (score ``s``): returns level, lanes, jobs ahead in its own lane, and per
-- other lane of its level how many of its jobs run first (share -> n)
local function q_ahead(m, id, s, share)
  local level = math.floor(s / TWO32)
  local lanes = lanes_of(m, level)
  local own = lanes[share]
  local n = redis.call('ZRANK', k_lane(m, level, share), id)
  local tag = own.base + (n + 1) * own.stride
  local others = {}
  for sh, l in pairs(lanes) do
    if sh ~= share then others[sh] = runs_before(m, level, sh, l, tag, own.since) end
  end
  return level, lanes, n, others
end

-- how many waiting jobs run before waiting job ``id`` (score ``s``, of ``share``)
local function q_rank(m, id, s, share)
  local level, _, n, others = q_ahead(m, id, s, share)
  local count = n + redis.call('ZCOUNT', k_queue(m), '-inf', '(' .. int(level * TWO32))
  for _, k in pairs(others) do count = count + k end
  return count
end
