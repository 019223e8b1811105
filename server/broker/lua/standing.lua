-- standing (read only): ARGV[3] model, [4] job id or '', [5] WIDTH, [6] the level
-- of a job not queued ('' = none).  Returns {running records (HGETALL each), per
-- whole lane ahead its totals then its popped sums (HMGET t:0.., p:0..), per lane
-- of which only the first jobs run ahead {the entries it uses (``u:entry``), HMGET
-- of their popped sums then their Fenwick prefix nodes} (the caller subtracts and
-- sums), 1 if the job waits (or no job was named) else 0}.  The jobs ahead of a
-- waiting job: every lane of the levels before its own, the jobs before it in its
-- own lane, and of each other lane of its level those whose turn comes first
-- (lua/queue.lua): a count, read as the lane's prefix up to its n-th job.
local m, id, width, newlevel = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local running = {}
for _, rid in ipairs(redis.call('ZRANGE', k_running(m), 0, -1)) do
  running[#running + 1] = redis.call('HGETALL', k_job(rid))
end
local s, share
if id ~= '' then
  s = redis.call('ZSCORE', k_queue(m), id)
  if s then
    s = tonumber(s)
    share = share_of(k_job(id))
  elseif not newlevel or newlevel == '' then
    return {running, {}, {}, 0}
  end
end
local tf = {}
for e = 0, width - 1 do tf[#tf + 1] = 't:' .. e end
for e = 0, width - 1 do tf[#tf + 1] = 'p:' .. e end
local uf = {}
for e = 0, width - 1 do uf[#uf + 1] = 'u:' .. e end
local totals, prefixes = {}, {}  -- whole lanes; lanes ahead up to a position
local function whole(level, sh)
  totals[#totals + 1] = redis.call('HMGET', k_fenwick(m, level, sh), unpack(tf))
end
local function upto(level, sh, pos)  -- the lane's jobs before position ``pos``
  local key = k_fenwick(m, level, sh)
  local used = {}
  for e, u in ipairs(redis.call('HMGET', key, unpack(uf))) do
    if u then used[#used + 1] = e - 1 end
  end
  if #used == 0 then return end
  local f = {}
  for _, e in ipairs(used) do f[#f + 1] = 'p:' .. e end
  local i = pos
  while i > 0 do
    for _, e in ipairs(used) do f[#f + 1] = int(i) .. ':' .. e end
    i = i - lowbit(i)
  end
  prefixes[#prefixes + 1] = {used, redis.call('HMGET', key, unpack(f))}
end
local level
local levels
if s then
  level = math.floor(s / TWO32)
  levels = redis.call('ZRANGEBYSCORE', k_levels(m), '-inf', '(' .. int(level))
elseif newlevel and newlevel ~= '' then  -- a job not queued: what it would queue behind
  levels = redis.call('ZRANGEBYSCORE', k_levels(m), '-inf', newlevel)
else
  levels = redis.call('ZRANGE', k_levels(m), 0, -1)
end
for _, l in ipairs(levels) do
  for sh in pairs(lanes_of(m, tonumber(l))) do whole(tonumber(l), sh) end
end
if s then
  local _, _, _, others = q_ahead(m, id, s, share)
  upto(level, share, s - level * TWO32)
  for sh, n in pairs(others) do
    local lane = k_lane(m, level, sh)
    if n >= redis.call('ZCARD', lane) then
      whole(level, sh)
    elseif n > 0 then
      local nth = redis.call('ZRANGE', lane, n - 1, n - 1, 'WITHSCORES')
      upto(level, sh, tonumber(nth[2]) + 1)
    end
  end
end
return {running, totals, prefixes, 1}
