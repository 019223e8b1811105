-- observe_cost: ARGV[3] model, [4] fit, [5] forget, [6] len(decayed), then the
-- decayed values, then the added ones.  cost4:{m}[fit] (a JSON list, missing =
-- zeros) becomes forget*old + decayed for the first part, old + added for the
-- rest; written with 17 significant digits (exact doubles).
local key = k_cost(ARGV[3])
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
