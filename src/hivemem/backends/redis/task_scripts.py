"""The Lua scripts of the Redis backend's task queues (see :mod:`.scripts` for the
conventions and helpers every script starts with, :mod:`.layout` for the keys).

Every task key lives in the partition of ``_tasks`` (the partition of every task event's
namespace ``_tasks/<queue>``), so one script changes a task, its queue's sets and appends
its event atomically, in one hash slot. ``T`` below is that partition's hash tag and
``q`` a queue name.

A ready task is either *due*, in ``T:tr:<q>`` (score ``-priority``, member
``<run_at in µs, 17 digits>`` .. id, so the set's order is the claim order: priority
desc, run_at, id), or *delayed*, in ``T:td:<q>`` (score run_at). A task becoming ready
is due if its run_at is not after the script's ``now``; a claim first moves the delayed
tasks that came due (at most :data:`PROMOTE_PER_CLAIM` per claim) into ``T:tr:<q>``,
then takes its first task (checking its run_at against the claim's ``now``, in case a
claimer with a clock ahead made it due).
"""

from __future__ import annotations

__all__ = [
    "PROMOTE_PER_CLAIM",
    "SETTLE_PER_CLAIM",
    "TASK_READ_HELPERS",
    "TASK_READ_SCRIPTS",
    "TASK_WRITE_HELPERS",
    "TASK_WRITE_SCRIPTS",
]

#: Expired leases a claim settles at most before it takes a task.
SETTLE_PER_CLAIM = 100
#: Delayed tasks that came due a claim moves into the due sets at most.
PROMOTE_PER_CLAIM = 1000

#: Helpers of every task script (after the common helpers of :mod:`.scripts`).
TASK_READ_HELPERS = r"""
local TASK = {'id', 'queue', 'state', 'payload', 'result', 'priority', 'run_at', 'attempt',
  'max_attempts', 'timeout', 'backoff', 'lease', 'lease_until', 'idempotency_key',
  'submitted_by', 'claimed_by', 'errors', 'created_at', 'updated_at', 'finished_at',
  'claimed_at'}
local function task_key(T, id) return T .. ':t:' .. id end
local function task_rec(T, id)
  return enc(redis.call('HMGET', task_key(T, id), unpack(TASK)), #TASK)
end
"""

#: Helpers of the task write scripts (after the write helpers and TASK_READ_HELPERS).
TASK_WRITE_HELPERS = r"""
local function run_key(run_at)
  return string.format('%017.0f', math.floor(tonumber(run_at) * 1000000))
end
local function ns_of(q) return '_tasks/' .. q end
-- The task (its hash already ready at run_at) enters its queue's ready sets.
local function to_ready(T, id, q, prio, run_at, now)
  if tonumber(run_at) <= now then
    redis.call('ZADD', T .. ':tr:' .. q, -tonumber(prio), run_key(run_at) .. id)
  else
    redis.call('ZADD', T .. ':td:' .. q, run_at, id)
  end
  redis.call('ZADD', T .. ':ts:ready:' .. q, 0, id)
end
local function off_ready(T, id, q, run_at)
  redis.call('ZREM', T .. ':tr:' .. q, run_key(run_at) .. id)
  redis.call('ZREM', T .. ':td:' .. q, id)
  redis.call('ZREM', T .. ':ts:ready:' .. q, id)
end
local function to_running(T, id, q, lease_until)
  redis.call('ZADD', T .. ':tl:' .. q, lease_until, id)
  redis.call('ZADD', T .. ':tlease', lease_until, id)
end
local function off_running(T, id, q)
  redis.call('ZREM', T .. ':tl:' .. q, id)
  redis.call('ZREM', T .. ':tlease', id)
end
local function to_finished(T, id, q, state, now_s)
  redis.call('ZADD', T .. ':ts:' .. state .. ':' .. q, 0, id)
  redis.call('ZADD', T .. ':tfin', now_s, id)
end
-- errors (a JSON array) with {"attempt", "error", "at", "worker"} appended.
local function add_error(errors, attempt, err, at_s, worker)
  local e = '{"attempt":' .. attempt .. ',"error":' .. cjson.encode(err) .. ',"at":' .. at_s
    .. ',"worker":' .. cjson.encode(worker or '') .. '}'
  if (not errors) or string.match(errors, '^%s*%[%s*%]%s*$') then return '[' .. e .. ']' end
  local head = string.match(errors, '^(.*)%]%s*$')
  return head .. ',' .. e .. ']'
end
-- Settle the expired lease of task id (see base.py); false when it is not (or no
-- longer) a running task whose lease ended by now.
local function settle(T, id, now, now_s)
  local tk = task_key(T, id)
  local h = redis.call('HMGET', tk, 'state', 'lease_until', 'attempt', 'max_attempts',
    'claimed_by', 'errors', 'queue', 'priority')
  if not h[1] then
    redis.call('ZREM', T .. ':tlease', id)
    return false
  end
  if h[1] ~= 'running' or not h[2] or tonumber(h[2]) > now then return false end
  local q = h[7]
  local errors = add_error(h[6], h[3], 'lease expired', now_s, h[5])
  off_running(T, id, q)
  redis.call('HDEL', tk, 'claimed_by', 'lease_until')
  if tonumber(h[3]) >= tonumber(h[4]) then
    redis.call('HSET', tk, 'state', 'dead', 'errors', errors, 'updated_at', now_s,
      'finished_at', now_s)
    to_finished(T, id, q, 'dead', now_s)
    emit(T, 'task.dead', ns_of(q), id, h[3], 'hivemem', now_s)
  else
    redis.call('HSET', tk, 'state', 'ready', 'errors', errors, 'run_at', now_s,
      'updated_at', now_s)
    to_ready(T, id, q, h[8], now_s, now)
    emit(T, 'task.expired', ns_of(q), id, h[3], 'hivemem', now_s)
  end
  return true
end
-- {'notfound'} or {'conflict', state, attempt, claimed_by} unless the task is running
-- attempt for worker; else false and the task's fields named.
local function held(T, id, worker, attempt, ...)
  local h = redis.call('HMGET', task_key(T, id), 'state', 'attempt', 'claimed_by', ...)
  if not h[1] then return {'notfound'}, h end
  if h[1] ~= 'running' or tonumber(h[2]) ~= tonumber(attempt) or h[3] ~= worker then
    return {'conflict', h[1], h[2], h[3] or ''}, h
  end
  return false, h
end
"""

#: KEYS: the task partition's meta. ARGV: tag, request key, ttl, then the 21 TaskRow
#: fields, each ``""`` (None) or ``"=" .. value``. Returns {'ok'|'dup', record of
#: (task record, '1' stored | '0' an existing task with that idempotency key)} or
#: {'conflict'} (the id is taken).
SUBMIT = r"""
local T, rk, ttl = ARGV[1], ARGV[2], ARGV[3]
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local v = {}
for i = 1, #TASK do v[i] = opt(ARGV[3 + i]) end
local id, q, ikey = v[1], v[2], v[14]
if ikey then
  local found = redis.call('HGET', T .. ':tk:' .. q, ikey)
  if found and redis.call('EXISTS', task_key(T, found)) == 1 then
    local payload = enc({task_rec(T, found), '0'}, 2)
    req_put(rk, ttl, payload)
    return {'ok', payload}
  end
end
local tk = task_key(T, id)
if redis.call('EXISTS', tk) == 1 then return {'conflict'} end
local f = {}
for i = 1, #TASK do
  if v[i] then f[#f + 1] = TASK[i]; f[#f + 1] = v[i] end
end
redis.call('HSET', tk, unpack(f))
redis.call('ZADD', T .. ':tn:' .. q, 0, id)
redis.call('SADD', T .. ':tqueues', q)
if ikey then redis.call('HSET', T .. ':tk:' .. q, ikey, id) end
to_ready(T, id, q, v[6], v[7], tonumber(v[19]))
emit(T, 'task.submitted', ns_of(q), id, v[8], v[15], v[19])
local payload = enc({task_rec(T, id), '1'}, 2)
req_put(rk, ttl, payload)
feed_done()
return {'ok', payload}
"""

#: ARGV: tag, queue, worker, now, lease, lease_until, request key, ttl, most leases to
#: settle, most delayed tasks to promote. Returns {'ok'|'dup', task record or ''}.
CLAIM = r"""
local T, q, worker, now_s, lease, until_s, rk, ttl =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local now = tonumber(now_s)
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local expired = redis.call('ZRANGEBYSCORE', T .. ':tl:' .. q, '-inf', now_s, 'LIMIT', 0, ARGV[9])
for _, id in ipairs(expired) do settle(T, id, now, now_s) end
local due = redis.call('ZRANGEBYSCORE', T .. ':td:' .. q, '-inf', now_s, 'LIMIT', 0, ARGV[10])
for _, id in ipairs(due) do
  local h = redis.call('HMGET', task_key(T, id), 'priority', 'run_at')
  redis.call('ZREM', T .. ':td:' .. q, id)
  if h[1] then redis.call('ZADD', T .. ':tr:' .. q, -tonumber(h[1]), run_key(h[2]) .. id) end
end
local rq = T .. ':tr:' .. q
local now_key = tonumber(run_key(now_s))
local pick = false
local first = redis.call('ZRANGE', rq, 0, 0)[1]
if first and tonumber(string.sub(first, 1, 17)) <= now_key then
  pick = first
elseif first then
  -- a task made due by a claim whose clock ran ahead of this one's: look further
  for _, m in ipairs(redis.call('ZRANGE', rq, 1, 99)) do
    if tonumber(string.sub(m, 1, 17)) <= now_key then pick = m; break end
  end
end
if not pick then
  req_put(rk, ttl, '')
  feed_done()
  return {'ok', ''}
end
local id = string.sub(pick, 18)
local tk = task_key(T, id)
redis.call('ZREM', rq, pick)
redis.call('ZREM', T .. ':ts:ready:' .. q, id)
local h = redis.call('HMGET', tk, unpack(TASK))
local attempt = int(tonumber(h[8]) + 1)
h[3], h[8], h[12], h[13], h[16], h[19], h[21] =
  'running', attempt, lease, until_s, worker, now_s, now_s
redis.call('HSET', tk, 'state', 'running', 'attempt', attempt, 'claimed_by', worker,
  'claimed_at', now_s, 'lease', lease, 'lease_until', until_s, 'updated_at', now_s)
to_running(T, id, q, until_s)
emit(T, 'task.claimed', ns_of(q), id, attempt, worker, now_s)
local payload = enc(h, #TASK)
req_put(rk, ttl, payload)
feed_done()
return {'ok', payload}
"""

#: ARGV: tag, id, worker, attempt, now, lease, lease_until, request key, ttl.
#: Returns {'ok'|'dup', task record}, {'notfound'} or {'conflict', state, attempt, worker}.
HEARTBEAT = r"""
local T, id, worker, attempt, now_s, lease, until_s, rk, ttl =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local refused, h = held(T, id, worker, attempt, 'queue')
if refused then return refused end
redis.call('HSET', task_key(T, id), 'lease', lease, 'lease_until', until_s, 'updated_at', now_s)
redis.call('ZADD', T .. ':tl:' .. h[4], until_s, id)
redis.call('ZADD', T .. ':tlease', until_s, id)
local payload = task_rec(T, id)
req_put(rk, ttl, payload)
return {'ok', payload}
"""

#: ARGV: tag, id, worker, attempt, now, outcome (completed|failed|released), result?,
#: error, retry_at (""), request key, ttl.
#: Returns {'ok'|'dup', task record}, {'notfound'} or {'conflict', state, attempt, worker}.
FINISH = r"""
local T, id, worker, attempt, now_s, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  ARGV[6]
local result, err, retry_at, rk, ttl = opt(ARGV[7]), ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local now = tonumber(now_s)
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local refused, h = held(T, id, worker, attempt, 'queue', 'max_attempts', 'errors', 'priority')
if refused then return refused end
local q, tk, n = h[4], task_key(T, id), tonumber(h[2])
off_running(T, id, q)
if outcome == 'completed' then
  redis.call('HDEL', tk, 'lease_until', 'result')
  redis.call('HSET', tk, 'state', 'completed', 'updated_at', now_s, 'finished_at', now_s)
  if result then redis.call('HSET', tk, 'result', result) end
  to_finished(T, id, q, 'completed', now_s)
  emit(T, 'task.completed', ns_of(q), id, h[2], worker, now_s)
elseif outcome == 'failed' then
  local errors = add_error(h[6], h[2], err, now_s, worker)
  redis.call('HDEL', tk, 'claimed_by', 'lease_until')
  if retry_at ~= '' and n < tonumber(h[5]) then
    redis.call('HSET', tk, 'state', 'ready', 'errors', errors, 'run_at', retry_at,
      'updated_at', now_s)
    to_ready(T, id, q, h[7], retry_at, now)
    emit(T, 'task.failed', ns_of(q), id, h[2], worker, now_s)
  else
    redis.call('HSET', tk, 'state', 'dead', 'errors', errors, 'updated_at', now_s,
      'finished_at', now_s)
    to_finished(T, id, q, 'dead', now_s)
    emit(T, 'task.dead', ns_of(q), id, h[2], worker, now_s)
  end
else
  local back = int(n - 1)
  redis.call('HDEL', tk, 'claimed_by', 'lease_until')
  redis.call('HSET', tk, 'state', 'ready', 'attempt', back, 'run_at', now_s, 'updated_at', now_s)
  to_ready(T, id, q, h[7], now_s, now)
  emit(T, 'task.released', ns_of(q), id, back, worker, now_s)
end
local payload = task_rec(T, id)
req_put(rk, ttl, payload)
feed_done()
return {'ok', payload}
"""

#: ARGV: tag, id, author, now, request key, ttl.
#: Returns {'ok'|'dup', task record}, {'notfound'} or {'conflict', state}.
CANCEL = r"""
local T, id, author, now_s, rk, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local tk = task_key(T, id)
local h = redis.call('HMGET', tk, 'state', 'queue', 'run_at', 'attempt')
if not h[1] then return {'notfound'} end
local q = h[2]
if h[1] == 'ready' then
  off_ready(T, id, q, h[3])
elseif h[1] == 'running' then
  off_running(T, id, q)
else
  return {'conflict', h[1]}
end
redis.call('HDEL', tk, 'claimed_by', 'lease_until')
redis.call('HSET', tk, 'state', 'cancelled', 'updated_at', now_s, 'finished_at', now_s)
to_finished(T, id, q, 'cancelled', now_s)
emit(T, 'task.cancelled', ns_of(q), id, h[4], author, now_s)
local payload = task_rec(T, id)
req_put(rk, ttl, payload)
feed_done()
return {'ok', payload}
"""

#: ARGV: tag, id, author, now, run_at, request key, ttl.
#: Returns {'ok'|'dup', task record}, {'notfound'} or {'conflict', state}.
REQUEUE = r"""
local T, id, author, now_s, run_at, rk, ttl =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local tk = task_key(T, id)
local h = redis.call('HMGET', tk, 'state', 'queue', 'priority')
if not h[1] then return {'notfound'} end
if h[1] ~= 'dead' and h[1] ~= 'cancelled' then return {'conflict', h[1]} end
local q = h[2]
redis.call('ZREM', T .. ':ts:' .. h[1] .. ':' .. q, id)
redis.call('ZREM', T .. ':tfin', id)
redis.call('HDEL', tk, 'result', 'claimed_by', 'claimed_at', 'lease_until', 'finished_at')
redis.call('HSET', tk, 'state', 'ready', 'attempt', '0', 'run_at', run_at, 'updated_at', now_s)
to_ready(T, id, q, h[3], run_at, tonumber(now_s))
emit(T, 'task.requeued', ns_of(q), id, '0', author, now_s)
local payload = task_rec(T, id)
req_put(rk, ttl, payload)
feed_done()
return {'ok', payload}
"""

#: ARGV: tag, now, limit. Settles up to limit expired leases of any queue, by
#: lease_until. Returns how many were settled.
EXPIRE_LEASES = r"""
local T, now_s = ARGV[1], ARGV[2]
local now = tonumber(now_s)
local settled = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', T .. ':tlease', '-inf', now_s, 'LIMIT', 0,
    ARGV[3])) do
  if settle(T, id, now, now_s) then settled = settled + 1 end
end
feed_done()
return settled
"""

#: ARGV: tag, finished before, limit. Deletes up to limit finished tasks with
#: finished_at < before (and their idempotency keys). Returns how many were deleted.
SWEEP_TASKS = r"""
local T, before = ARGV[1], ARGV[2]
local deleted = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', T .. ':tfin', '-inf', '(' .. before, 'LIMIT', 0,
    ARGV[3])) do
  local tk = task_key(T, id)
  local h = redis.call('HMGET', tk, 'state', 'queue', 'idempotency_key')
  redis.call('ZREM', T .. ':tfin', id)
  if h[1] then
    local q = h[2]
    redis.call('DEL', tk)
    redis.call('ZREM', T .. ':tn:' .. q, id)
    redis.call('ZREM', T .. ':ts:' .. h[1] .. ':' .. q, id)
    if h[3] and redis.call('HGET', T .. ':tk:' .. q, h[3]) == id then
      redis.call('HDEL', T .. ':tk:' .. q, h[3])
    end
    deleted = deleted + 1
  end
end
return deleted
"""

#: ARGV: tag, id. Returns the task record, or false.
TASK_GET = r"""
local T, id = ARGV[1], ARGV[2]
if redis.call('EXISTS', task_key(T, id)) == 0 then return false end
return task_rec(T, id)
"""

#: ARGV: tag, queue, state (""), after (""), limit. Returns task records by id.
TASK_LIST = r"""
local T, q, state, after, limit = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ids
if state == 'running' then
  ids = redis.call('ZRANGE', T .. ':tl:' .. q, 0, -1)
else
  local set = T .. ':tn:' .. q
  if state ~= '' then set = T .. ':ts:' .. state .. ':' .. q end
  local lo = '-'
  if after ~= '' then lo = '(' .. after end
  ids = redis.call('ZRANGEBYLEX', set, lo, '+', 'LIMIT', 0, limit)
end
local out = {}
for _, id in ipairs(ids) do
  if redis.call('EXISTS', task_key(T, id)) == 1 then out[#out + 1] = task_rec(T, id) end
end
return out
"""

#: ARGV: tag, queue, now. Returns {ready, delayed, running, completed, dead, cancelled,
#: oldest due run_at or false}.
TASK_STATS = r"""
local T, q, now_s = ARGV[1], ARGV[2], ARGV[3]
local tr, td = T .. ':tr:' .. q, T .. ':td:' .. q
local ready = redis.call('ZCARD', tr) + redis.call('ZCOUNT', td, '-inf', now_s)
local delayed = redis.call('ZCOUNT', td, '(' .. now_s, '+inf')
local oldest, best = false, false
local function consider(id)
  local run_at = redis.call('HGET', task_key(T, id), 'run_at')
  if run_at and ((not best) or tonumber(run_at) < best) then
    oldest, best = run_at, tonumber(run_at)
  end
end
local first = redis.call('ZRANGEBYSCORE', td, '-inf', now_s, 'LIMIT', 0, 1)[1]
if first then consider(first) end
-- the earliest due task of each priority comes first in its score group of tr
local lo = '-inf'
while true do
  local got = redis.call('ZRANGEBYSCORE', tr, lo, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if not got[1] then break end
  consider(string.sub(got[1], 18))
  lo = '(' .. got[2]
end
local function card(state) return redis.call('ZCARD', T .. ':ts:' .. state .. ':' .. q) end
return {ready, delayed, redis.call('ZCARD', T .. ':tl:' .. q), card('completed'), card('dead'),
  card('cancelled'), oldest}
"""

#: ARGV: tag. Returns the queues that hold a task, sorted (every queue submitted to is in
#: the set :tqueues; one whose tasks were all swept is left out).
TASK_QUEUES = r"""
local T = ARGV[1]
local out = {}
for _, q in ipairs(redis.call('SMEMBERS', T .. ':tqueues')) do
  if redis.call('ZCARD', T .. ':tn:' .. q) > 0 then out[#out + 1] = q end
end
table.sort(out)
return out
"""

TASK_WRITE_SCRIPTS = {
    "task_submit": SUBMIT,
    "task_claim": CLAIM,
    "task_heartbeat": HEARTBEAT,
    "task_finish": FINISH,
    "task_cancel": CANCEL,
    "task_requeue": REQUEUE,
    "task_expire": EXPIRE_LEASES,
    "task_sweep": SWEEP_TASKS,
}
TASK_READ_SCRIPTS = {
    "task_get": TASK_GET,
    "task_list": TASK_LIST,
    "task_stats": TASK_STATS,
    "task_queues": TASK_QUEUES,
}
