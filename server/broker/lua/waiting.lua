-- waiting (read only): ARGV[3] model, [4] limit.  The ids of the first ``limit``
-- waiting jobs in run order: the levels in order, each a merge of its lanes by
-- their turns (lua/queue.lua).
local m, limit = ARGV[3], tonumber(ARGV[4])
local out = {}
for _, l in ipairs(redis.call('ZRANGE', k_levels(m), 0, -1)) do
  if #out >= limit then break end
  local level = tonumber(l)
  local lanes = {}
  for sh, lane in pairs(lanes_of(m, level)) do
    lane.ids = redis.call('ZRANGE', k_lane(m, level, sh), 0, limit - #out - 1)
    lane.n = 0
    lanes[#lanes + 1] = lane
  end
  while #out < limit do
    local best, bt
    for _, lane in ipairs(lanes) do
      if lane.n < #lane.ids then
        local t = lane.base + (lane.n + 1) * lane.stride
        if best == nil or t < bt or (t == bt and lane.since < best.since) then best, bt = lane, t end
      end
    end
    if best == nil then break end
    best.n = best.n + 1
    out[#out + 1] = best.ids[best.n]
  end
end
return out
