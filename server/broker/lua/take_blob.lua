-- take_blob: ARGV[3] blob key (without the prefix), [4] job id or '', then
-- field/JSON pairs.  The bytes, deleted in the same step (of two takers, one gets
-- them); when they were there and the job exists, its fields are set too (one
-- change event).  Returns the bytes, or false.
local data = redis.call('GET', P .. ARGV[3])
if not data then return false end
redis.call('DEL', P .. ARGV[3])
local id = ARGV[4]
if id ~= '' then
  local jk = k_job(id)
  if redis.call('EXISTS', jk) == 1 then
    set_pairs(jk, 5)
    event(id, model_of(jk), 'change')
  end
end
return data
