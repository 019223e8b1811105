-- migrate_lanes: no arguments.  Jobs left waiting by a version before fair share
-- (in ``q:{m}``, in no lane) join their lanes at the tail, in their old order; that
-- layout's per-level sums, popped lists and counters go.  Every node runs it when it
-- starts; with nothing to move it only reads each queue.  Returns how many moved.
local moved = 0
for _, m in ipairs(redis.call('SMEMBERS', K_MODELS)) do
  local entries = redis.call('ZRANGE', k_queue(m), 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    local id, score = entries[i], tonumber(entries[i + 1])
    local jk = k_job(id)
    local level, share = math.floor(score / TWO32), share_of(jk)
    if not redis.call('ZSCORE', k_lane(m, level, share), id) then
      redis.call('ZREM', k_queue(m), id)
      redis.call('DEL', k_old_fenwick(m, level), k_old_popped(m, level))
      redis.call('HDEL', k_counters(m), 'h' .. int(level), 't' .. int(level))
      if redis.call('EXISTS', jk) == 1 then
        q_push(m, id, level, false, redis.call('HGET', jk, 'vec') or '', share, stride_of(jk))
        moved = moved + 1
      end
    end
  end
end
return moved
