-- standing (read only): ARGV[3] model, [4] job id or '', [5] WIDTH.  Returns
-- {running records (HGETALL each), per level ahead its totals then its popped sums
-- (HMGET t:0.., p:0..), for the job's own level {the entries it uses (``u:entry``),
-- HMGET of their popped sums then their Fenwick prefix nodes} (the caller subtracts
-- and sums), 1 if the job waits (or no job was named) else 0}.
local m, id, width, newlevel = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local running = {}
for _, rid in ipairs(redis.call('ZRANGE', k_running(m), 0, -1)) do
  running[#running + 1] = redis.call('HGETALL', k_job(rid))
end
local level, pos
if id ~= '' then
  local s = redis.call('ZSCORE', k_queue(m), id)
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
  levels = redis.call('ZRANGEBYSCORE', k_levels(m), '-inf', '(' .. int(level))
elseif newlevel and newlevel ~= '' then  -- a job not queued: what it would queue behind
  levels = redis.call('ZRANGEBYSCORE', k_levels(m), '-inf', newlevel)
else
  levels = redis.call('ZRANGE', k_levels(m), 0, -1)
end
local tf, pf = {}, {}
for e = 0, width - 1 do tf[#tf + 1] = 't:' .. e end
for e = 0, width - 1 do tf[#tf + 1] = 'p:' .. e; pf[#pf + 1] = 'p:' .. e end
local totals = {}  -- per level: its totals, then its popped sums
for _, l in ipairs(levels) do totals[#totals + 1] = redis.call('HMGET', k_fenwick(m, tonumber(l)), unpack(tf)) end
local prefix = {}  -- the entries the job's level uses, then their popped sums and prefix nodes
if pos then
  local key = k_fenwick(m, level)
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
