-- put_attempt_blob: ARGV[3] id, [4] attempt, [5] blob key, [6] bytes, [7] TTL.
-- Stores the blob (a preview) only while that attempt is the job's current one and
-- it runs: a worker that lost its lease writes nothing.  Returns 1 or 0.
local jk = k_job(ARGV[3])
if redis.call('HGET', jk, 'attempt') ~= ARGV[4] or redis.call('HGET', jk, 'status') ~= '"running"' then return 0 end
redis.call('SET', P .. ARGV[5], ARGV[6], 'EX', ARGV[7])
return 1
