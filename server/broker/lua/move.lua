-- move: ARGV[3] id, [4] '1' to the front of its lane (else the back), [5] '1' first
-- of its level: its lane's turn next.  Only a waiting job; its lane keeps its turns
-- (the level's ``rr`` hash is as it was, but for ``first``).  Returns 1 or 0.
local id, front, first = ARGV[3], ARGV[4] == '1', ARGV[5] == '1'
local jk = k_job(id)
if redis.call('HGET', jk, 'status') ~= '"waiting"' then return 0 end
local m = model_of(jk)
local s = redis.call('ZSCORE', k_queue(m), id)
if not s then return 0 end
local level, share, vec = math.floor(tonumber(s) / TWO32), share_of(jk), redis.call('HGET', jk, 'vec') or ''
local tk = k_turns(m, level)
local turns = redis.call('HGETALL', tk)
q_take(m, id, tonumber(s), vec, share, false)
q_push(m, id, level, front or first, vec, share, stride_of(jk))
redis.call('DEL', tk)
redis.call('HSET', tk, unpack(turns))
if first then q_first(m, level, share) end
event(id, m, 'change')
return 1
