"""The Lua scripts of the Redis backend.

Every change runs as one script (Redis runs a script alone, start to end, so its
reads, checks and writes form one atomic step). A write script checks everything it
checks (versions, existence, a stored request-id result) before its first write, so
a refused write (Conflict, NotFound) writes nothing. Scripts touch only keys of the
partitions named in ``KEYS`` (their ``<tag>:meta`` keys): in a cluster one hash slot.

Conventions:

* ``<tag>`` is a partition's hash tag, ``{hm:p<N>}``; an item's member is
  ``namespace .. "\\0" .. key`` (namespaces hold no NUL, so member order is
  (namespace, key) order).
* Optional string arguments arrive as ``""`` (absent) or ``"=" .. value``.
* Records returned (and stored as request-id results) are length-prefixed fields:
  ``<len>:<bytes>`` per field, ``~`` for a missing one (see ``layout.unpack``).
* The request-key argument ``rk`` is ``<tag>:req:<id>`` (the result key, in the
  written partition), optionally followed by ``#<fingerprint>`` and then by
  ``#<binding key>`` (``<tag'>:bind:<id>``, in the partition of the id itself);
  ``req_get``/``req_put`` split it (ids and fingerprints hold no ``#``). A result
  stored with a fingerprint is ``#<fingerprint>\\n<payload>`` (a payload never
  starts with ``#``) and its binding key holds the fingerprint. ``req_get`` raises the
  error ``HMREQUEST ...`` (the backend raises RequestIdReused) when the stored result
  or the binding has another fingerprint (both non-empty); every write script calls
  ``req_get`` before its first write, so such a call writes nothing; a repeat returns
  ``{'dup', stored payload, stored fingerprint or ''}``. The binding key
  makes the check independent of the partition written (a reused id may name another
  namespace tree or session); when it lives in another slot of a cluster the backend
  checks it first with ``BIND_REQUEST`` and passes no binding key.
* Numbers cross as decimal strings made by Python (``repr`` of a float round-trips);
  floats computed here are written with ``%.17g`` (exact for a double).
* Feed event ids are ``<ts>-<seq>``: ``ts`` = max(server TIME in microseconds, the
  partition's last ts + 1) once per script, ``seq`` counts the script's events, so
  ids grow in commit order in every partition and one script's events (a batch over
  several partitions on a standalone server) share ``ts`` in order of ``seq``.
"""

from __future__ import annotations

from hivemem.backends.redis.task_scripts import (
    TASK_READ_HELPERS,
    TASK_READ_SCRIPTS,
    TASK_WRITE_HELPERS,
    TASK_WRITE_SCRIPTS,
)

__all__ = ["READ_SCRIPTS", "WRITE_SCRIPTS"]

#: Helpers every script starts with.
_COMMON = r"""
local NUL = string.char(0)
local function enc(t, n)
  local out = {}
  for i = 1, n do
    local v = t[i]
    if v == nil or v == false then out[i] = '~' else out[i] = #v .. ':' .. v end
  end
  return table.concat(out)
end
-- The fields of an argument packed as ``<len>:<bytes>`` each (layout.pack).
local function dec(s)
  local t, i, n = {}, 1, #s
  while i <= n do
    local j = string.find(s, ':', i, true)
    local len = tonumber(string.sub(s, i, j - 1))
    t[#t + 1] = string.sub(s, j + 1, j + len)
    i = j + 1 + len
  end
  return t
end
local function int(x) return string.format('%.0f', x) end
local function opt(s) if s == '' then return false end return string.sub(s, 2) end
local function split(m)
  local i = string.find(m, NUL, 1, true)
  return string.sub(m, 1, i - 1), string.sub(m, i + 1)
end
local function ts_of(id) return tonumber(string.match(id, '^(%d+)')) end
local function live(ver, e, now) return ver and not (e and tonumber(e) <= now) end
local ITEM = {'v', 'ver', 'a', 'c', 'u', 'e', 't', 'm'}
local function item_rec(m, h)
  local ns, key = split(m)
  return enc({ns, key, h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]}, 10)
end
local SESSION = {'app', 'user', 'agent', 'created_by', 'metadata', 'state', 'state_version',
  'messages', 'turns', 'tokens_in', 'tokens_out', 'cost', 'started_at', 'last_activity_at', 'ttl'}
-- Whether a session whose hash holds last_activity_at ``last`` and ``ttl`` (false: none)
-- has expired at ``now`` (a number): last + ttl <= now, as rows.session_expired.
local function session_expired(last, ttl, now)
  return ttl and tonumber(last) + tonumber(ttl) <= now
end
"""

#: Helpers of scripts that write: the feed, request ids, item removal.
_WRITE = r"""
local FEED_T = false
local FEED_SEQ = 0
local FEED_LAST = {}
local HINTS = {}
local HINTS_LEN = 0
local function feed_ts()
  if not FEED_T then
    local t = redis.call('TIME')
    local T = tonumber(t[1]) * 1000000 + tonumber(t[2])
    for i = 1, #KEYS do
      local last = redis.call('HGET', KEYS[i], 'last')
      if last then
        local ts = ts_of(last)
        if ts >= T then T = ts + 1 end
      end
    end
    FEED_T = T
  end
  return FEED_T
end
local function emit(tag, typ, ns, key, ver, author, at, data)
  local id = int(feed_ts()) .. '-' .. FEED_SEQ
  FEED_SEQ = FEED_SEQ + 1
  local f = {'t', typ, 'n', ns, 'a', author, 'at', at}
  if key then f[#f + 1] = 'k'; f[#f + 1] = key end
  if ver then f[#f + 1] = 'v'; f[#f + 1] = ver end
  if data then f[#f + 1] = 'd'; f[#f + 1] = data end
  redis.call('XADD', tag .. ':feed', id, unpack(f))
  FEED_LAST[tag] = id
  if key and string.sub(ns, 1, 7) == '_tasks/' and HINTS_LEN >= 0 then
    local hint = ' ' .. typ .. ' ' .. string.sub(ns, 8) .. ' ' .. key
    HINTS_LEN = HINTS_LEN + #hint
    if HINTS_LEN > 7000 then HINTS = {' *'}; HINTS_LEN = -1 else HINTS[#HINTS + 1] = hint end
  end
  return id
end
local function feed_done()
  local any = false
  for tag, id in pairs(FEED_LAST) do
    redis.call('HSET', tag .. ':meta', 'last', id)
    any = true
  end
  if any then redis.call('PUBLISH', 'hivemem:changes', '1' .. table.concat(HINTS)) end
end
local function req_split(rk)
  local i = string.find(rk, '#', 1, true)
  if not i then return rk, '', false end
  local key, rest = string.sub(rk, 1, i - 1), string.sub(rk, i + 1)
  local j = string.find(rest, '#', 1, true)
  if not j then return key, rest, false end
  return key, string.sub(rest, 1, j - 1), string.sub(rest, j + 1)
end
local function req_reused()
  return error({err = 'HMREQUEST request id already used for a different request'})
end
local REQ_FP = ''
local function req_get(rk)
  if rk == '' then return false end
  local key, fp, bk = req_split(rk)
  local stored = redis.call('GET', key)
  if stored then
    if string.sub(stored, 1, 1) == '#' then
      local nl = string.find(stored, '\n', 2, true)
      REQ_FP = string.sub(stored, 2, nl - 1)
      if fp ~= '' and REQ_FP ~= '' and fp ~= REQ_FP then req_reused() end
      stored = string.sub(stored, nl + 1)
    end
    return stored
  end
  if bk and fp ~= '' then
    local bound = redis.call('GET', bk)
    if bound and bound ~= fp then req_reused() end
  end
  return false
end
local function req_put(rk, ttl, payload)
  if rk == '' then return end
  local key, fp, bk = req_split(rk)
  if fp ~= '' then payload = '#' .. fp .. '\n' .. payload end
  redis.call('SET', key, payload, 'PX', ttl)
  if bk and fp ~= '' then redis.call('SET', bk, fp, 'PX', ttl) end
end
local function drop_item(tag, m)
  redis.call('DEL', tag .. ':i:' .. m, tag .. ':h:' .. m)
  redis.call('ZREM', tag .. ':keys', m)
  redis.call('ZREM', tag .. ':exp', m)
  redis.call('ZREM', tag .. ':idx', m)
  redis.call('ZREM', tag .. ':pend', m)
end
-- An index entry written with a model and no vector waits for the indexer in the
-- partition's ``pend`` set (score: the time it began waiting).
local function pend(tag, m, itext, vec, model, now_s)
  if itext and model and not vec then
    redis.call('ZADD', tag .. ':pend', now_s, m)
  else
    redis.call('ZREM', tag .. ':pend', m)
  end
end
local function session_rec(tag, sid)
  local h = redis.call('HMGET', tag .. ':s:' .. sid, unpack(SESSION))
  local t = {sid}
  for i = 1, 15 do t[i + 1] = h[i] end
  return enc(t, 16)
end
-- The live session ``sid`` at ``now`` (a number): {last_activity_at, ttl}, or false when
-- absent or expired.
local function session_live(tag, sid, now)
  local h = redis.call('HMGET', tag .. ':s:' .. sid, 'last_activity_at', 'ttl')
  if not h[1] or session_expired(h[1], h[2], now) then return false end
  return h
end
-- Move the session's expiry to ``now_s`` + its ttl (sessions with a ttl only).
local function session_touch(tag, sid, ttl, now_s)
  if ttl then
    local at = string.format('%.17g', tonumber(now_s) + tonumber(ttl))
    redis.call('ZADD', tag .. ':sexp', at, sid)
  end
end
"""

# --- writes ----------------------------------------------------------------------------

#: The item helper of WRITE_ITEMS and PUT_GROUP: ``apply(w, author, now, now_s, hl)`` applies
#: write ``w`` (the decoded fields of one packed write, as WRITE_ITEMS's ARGV describes)
#: whose checks passed, emits its events and returns its result: ``'1'`` for a check, or
#: a delete that deleted, ``'0'`` for a delete of nothing, the item's record for a put.
_APPLY = r"""
local function opt_event(e, default) if e == '' then return default end return e end
local function apply(w, author, now, now_s, hl)
  local op, tag, ns, key = w[1], w[2], w[3], w[4]
  if op == 'C' then return '1' end
  local m = ns .. NUL .. key
  local ik = tag .. ':i:' .. m
  local h = redis.call('HMGET', ik, 'ver', 'c', 'e')
  local cur, created = 0, false
  if h[1] then
    if h[3] and tonumber(h[3]) <= now then
      drop_item(tag, m)
      emit(tag, 'item.expired', ns, key, h[1], 'hivemem', now_s)
    else
      cur, created = tonumber(h[1]), h[2]
    end
  end
  if op == 'D' then
    if cur > 0 then
      drop_item(tag, m)
      emit(tag, opt_event(w[13], 'item.deleted'), ns, key, int(cur), author, now_s)
      return '1'
    end
    return '0'
  end
  local value, text, meta, exp = w[6], opt(w[7]), opt(w[8]), w[9]
  local itext, vec, model = opt(w[10]), opt(w[11]), opt(w[12])
  local ver = int(cur + 1)
  created = created or now_s
  if exp == '' then exp = false end
  redis.call('DEL', ik)
  local f = {'v', value, 'ver', ver, 'a', author, 'c', created, 'u', now_s}
  if exp then
    f[#f + 1] = 'e'; f[#f + 1] = exp
    redis.call('ZADD', tag .. ':exp', exp, m)
  else
    redis.call('ZREM', tag .. ':exp', m)
  end
  if text then f[#f + 1] = 't'; f[#f + 1] = text end
  if meta then f[#f + 1] = 'm'; f[#f + 1] = meta end
  if itext then
    f[#f + 1] = 'xv'; f[#f + 1] = ver; f[#f + 1] = 'xt'; f[#f + 1] = itext
    if vec then f[#f + 1] = 'xe'; f[#f + 1] = vec end
    if model then f[#f + 1] = 'xm'; f[#f + 1] = model end
    redis.call('ZADD', tag .. ':idx', 0, m)
  else
    redis.call('ZREM', tag .. ':idx', m)
  end
  pend(tag, m, itext, vec, model, now_s)
  redis.call('HSET', ik, unpack(f))
  redis.call('ZADD', tag .. ':keys', 0, m)
  local rec = enc({ns, key, value, ver, author, created, now_s, exp, text, meta}, 10)
  if hl > 0 then
    local hk = tag .. ':h:' .. m
    redis.call('ZADD', hk, cur + 1, rec)
    redis.call('ZREMRANGEBYSCORE', hk, '-inf', cur + 1 - hl)
  end
  emit(tag, opt_event(w[13], 'item.put'), ns, key, ver, author, now_s)
  return rec
end
"""


#: KEYS: meta key of every partition written (the first one holds the request id).
#: ARGV: now, author, history_limit, request key, request ttl ms, n, then one argument
#: per write packing 13 fields (``<len>:<bytes>`` each, see ``dec``; one argument costs
#: the client far less to send than thirteen): op (P put, D delete, C check only), tag,
#: ns, key, if_version (""), value, text?, metadata?, expires_at (""), index_text?,
#: vector?, model?, event type ("": the default, item.put or item.deleted).
#: Returns {'ok'|'dup', record of results ('1' for a check)} or {'conflict', index,
#: current version}.
WRITE_ITEMS = r"""
local now_s, author, hl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local rk, ttl, n = ARGV[4], ARGV[5], tonumber(ARGV[6])
local now = tonumber(now_s)
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local W = {}
for i = 1, n do W[i] = dec(ARGV[6 + i]) end
local function arg(i, j) return W[i][j] end
local sim = {}
for i = 1, n do
  local op, ik, ifv = arg(i, 1), arg(i, 2) .. ':i:' .. arg(i, 3) .. NUL .. arg(i, 4), arg(i, 5)
  local cur = sim[ik]
  if cur == nil then
    local h = redis.call('HMGET', ik, 'ver', 'e')
    cur = 0
    if live(h[1], h[2], now) then cur = tonumber(h[1]) end
  end
  if ifv ~= '' and (tonumber(ifv) ~= cur or (cur == 0 and op == 'D')) then
    return {'conflict', tostring(i - 1), int(cur)}
  end
  if op == 'D' then sim[ik] = 0 elseif op == 'P' then sim[ik] = cur + 1 else sim[ik] = cur end
end
local results = {}
for i = 1, n do results[i] = apply(W[i], author, now, now_s, hl) end
local payload = enc(results, n)
req_put(rk, ttl, payload)
feed_done()
return {'ok', payload}
"""

#: Single puts of several callers committed together (the backend's group commit; see
#: ``RedisItems._put_one``), each decided alone: a put whose ``if_version`` does not
#: match writes nothing and gets ``'!' .. current version`` as its result; the others
#: apply in order (a later put of the same key sees the earlier one). One request key,
#: one feed head update and one change notification for the group.
#: KEYS: meta key of every partition written (the first one holds the request key).
#: ARGV: request key, request ttl ms, n, then one argument per put packing the 13
#: fields of a WRITE_ITEMS put followed by its author, now and history limit.
#: Returns {'ok'|'dup', record of results}.
PUT_GROUP = r"""
local rk, ttl, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local results = {}
for i = 1, n do
  local w = dec(ARGV[3 + i])
  local now_s = w[15]
  local now = tonumber(now_s)
  local ifv, cur = w[5], false
  if ifv ~= '' then
    local h = redis.call('HMGET', w[2] .. ':i:' .. w[3] .. NUL .. w[4], 'ver', 'e')
    cur = 0
    if live(h[1], h[2], now) then cur = tonumber(h[1]) end
    if tonumber(ifv) == cur then cur = false end
  end
  if cur then
    results[i] = '!' .. int(cur)
  else
    results[i] = apply(w, w[14], now, now_s, tonumber(w[16]))
  end
end
local payload = enc(results, n)
req_put(rk, ttl, payload)
feed_done()
return {'ok', payload}
"""

#: KEYS: the session's partition meta. ARGV: tag, id, request key, ttl, then the 15
#: SESSION fields (user, agent and the session's ttl optional). A session with a ttl
#: enters the expiry set. Returns {'ok'|'dup', record} or {'conflict'}.
CREATE_SESSION = r"""
local tag, sid, rk, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local sk = tag .. ':s:' .. sid
if redis.call('EXISTS', sk) == 1 then return {'conflict'} end
local f, vals = {}, {sid}
for i = 1, 15 do
  local v = ARGV[4 + i]
  if i == 2 or i == 3 or i == 15 then v = opt(v) end
  vals[i + 1] = v
  if v then f[#f + 1] = SESSION[i]; f[#f + 1] = v end
end
redis.call('DEL', tag .. ':msg:' .. sid)
redis.call('HSET', sk, unpack(f))
session_touch(tag, sid, vals[16], ARGV[18])
emit(tag, 'session.created', '_sessions/' .. sid, false, '0', ARGV[8], ARGV[17])
local payload = enc(vals, 16)
req_put(rk, ttl, payload)
feed_done()
return {'ok', payload}
"""

#: ARGV: tag, id, request key, ttl, now, author, n, turns, tokens_in, tokens_out, cost,
#: then per message: role, content, tokens_in, tokens_out, cost, metadata.
#: Returns {'ok'|'dup', record of message records} or {'notfound'} (absent or expired
#: at now: nothing written). Moves last_activity_at and the expiry to now.
APPEND_MESSAGES = r"""
local tag, sid, rk, ttl, now, author = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local n = tonumber(ARGV[7])
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local sk = tag .. ':s:' .. sid
local live = session_live(tag, sid, tonumber(now))
if not live then return {'notfound'} end
session_touch(tag, sid, live[2], now)
local total = redis.call('HINCRBY', sk, 'messages', n)
redis.call('HINCRBY', sk, 'turns', ARGV[8])
redis.call('HINCRBY', sk, 'tokens_in', ARGV[9])
redis.call('HINCRBY', sk, 'tokens_out', ARGV[10])
local cost = tonumber(redis.call('HGET', sk, 'cost')) + tonumber(ARGV[11])
redis.call('HSET', sk, 'cost', string.format('%.17g', cost), 'last_activity_at', now)
local first = total - n + 1
local rows = {}
for i = 1, n do
  local b = 11 + (i - 1) * 6
  local seq = first + i - 1
  local rec = enc({sid, int(seq), ARGV[b + 1], ARGV[b + 2], author, now, ARGV[b + 3],
    ARGV[b + 4], ARGV[b + 5], ARGV[b + 6]}, 10)
  redis.call('ZADD', tag .. ':msg:' .. sid, seq, rec)
  rows[i] = rec
end
emit(tag, 'session.messages', '_sessions/' .. sid, false, int(total), author, now)
local payload = enc(rows, n)
req_put(rk, ttl, payload)
feed_done()
return {'ok', payload}
"""

#: ARGV: tag, id, request key, ttl, state, if_version (""), now, author.
#: Returns {'ok'|'dup', session record}, {'notfound'} (absent or expired at now) or
#: {'conflict', current}; a refusal writes nothing. Moves last_activity_at and the
#: expiry to now.
SAVE_STATE = r"""
local tag, sid, rk, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local state, ifv, now, author = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local sk = tag .. ':s:' .. sid
local live = session_live(tag, sid, tonumber(now))
if not live then return {'notfound'} end
local sv = tonumber(redis.call('HGET', sk, 'state_version'))
if ifv ~= '' and tonumber(ifv) ~= sv then return {'conflict', int(sv)} end
redis.call('HSET', sk, 'state', state, 'state_version', int(sv + 1), 'last_activity_at', now)
session_touch(tag, sid, live[2], now)
emit(tag, 'session.state', '_sessions/' .. sid, false, int(sv + 1), author, now)
local payload = session_rec(tag, sid)
req_put(rk, ttl, payload)
feed_done()
return {'ok', payload}
"""

#: ARGV: tag, id, request key, ttl, now, author.
#: Returns {'ok', '1', app, user, agent}, {'ok', '0'} (absent, or expired at now: then
#: left for the sweeper) or {'dup', stored}.
DELETE_SESSION = r"""
local tag, sid, rk, ttl, now, author = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local sk = tag .. ':s:' .. sid
local h = redis.call('HMGET', sk, 'app', 'user', 'agent', 'last_activity_at', 'ttl')
if not h[1] or session_expired(h[4], h[5], tonumber(now)) then
  req_put(rk, ttl, '0')
  return {'ok', '0'}
end
redis.call('DEL', sk, tag .. ':msg:' .. sid)
redis.call('ZREM', tag .. ':sexp', sid)
emit(tag, 'session.deleted', '_sessions/' .. sid, false, false, author, now)
req_put(rk, ttl, '1')
feed_done()
return {'ok', '1', h[1], h[2], h[3]}
"""

#: ARGV: tag, channel, payload, author, now, request key, ttl.
#: Returns {'ok'|'dup', record (event id, channel, author, now, payload)}.
PUBLISH = r"""
local tag, channel, data, author, now, rk, ttl =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local stored = req_get(rk)
if stored then return {'dup', stored, REQ_FP} end
local id = emit(tag, 'publish', channel, false, false, author, now, data)
local payload = enc({id, channel, author, now, data}, 5)
req_put(rk, ttl, payload)
feed_done()
return {'ok', payload}
"""

#: KEYS: the meta key of the binding key's partition (routes the call; not written).
#: ARGV: binding key, fingerprint, ttl, bind|unbind. bind: {'ok'} when the key is absent
#: (then set to the fingerprint) or holds it; {'reused'} when it holds another one.
#: unbind: deletes the key if it holds the fingerprint (a refused write stored nothing).
BIND_REQUEST = r"""
local bk, fp, ttl, op = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local bound = redis.call('GET', bk)
if op == 'unbind' then
  if bound == fp then redis.call('DEL', bk) end
  return {'ok'}
end
if bound and bound ~= fp then return {'reused'} end
if not bound then redis.call('SET', bk, fp, 'PX', ttl) end
return {'ok'}
"""

#: ARGV: tag, now, trim before (microseconds), most items to expire, most sessions to
#: expire. Returns {items and sessions expired, events trimmed, {id, app, user, agent}
#: of each expired session (for the global session indexes)}.
SWEEP = r"""
local tag, now_s, before, most = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local most_sessions = tonumber(ARGV[5])
local now = tonumber(now_s)
local expired = 0
local due = redis.call('ZRANGEBYSCORE', tag .. ':exp', '-inf', now_s, 'LIMIT', 0, most)
for _, m in ipairs(due) do
  local h = redis.call('HMGET', tag .. ':i:' .. m, 'ver', 'e')
  if h[1] and h[2] and tonumber(h[2]) <= now then
    local ns, key = split(m)
    drop_item(tag, m)
    emit(tag, 'item.expired', ns, key, h[1], 'hivemem', now_s)
    expired = expired + 1
  else
    redis.call('ZREM', tag .. ':exp', m)
  end
end
local gone = {}
local sdue = redis.call('ZRANGEBYSCORE', tag .. ':sexp', '-inf', now_s, 'LIMIT', 0, most_sessions)
for _, sid in ipairs(sdue) do
  local sk = tag .. ':s:' .. sid
  local h = redis.call('HMGET', sk, 'app', 'user', 'agent', 'last_activity_at', 'ttl')
  if h[1] and session_expired(h[4], h[5], now) then
    redis.call('DEL', sk, tag .. ':msg:' .. sid)
    redis.call('ZREM', tag .. ':sexp', sid)
    emit(tag, 'session.expired', '_sessions/' .. sid, false, false, 'hivemem', now_s)
    gone[#gone + 1] = {sid, h[1], h[2] or false, h[3] or false}
    expired = expired + 1
  elseif h[1] and h[5] then
    session_touch(tag, sid, h[5], h[4])
  else
    redis.call('ZREM', tag .. ':sexp', sid)
  end
end
local trimmed = 0
local last = redis.call('XREVRANGE', tag .. ':feed', '(' .. before .. '-0', '-', 'COUNT', 1)
if last[1] then
  redis.call('HSET', tag .. ':meta', 'trim', last[1][1])
  trimmed = redis.call('XTRIM', tag .. ':feed', 'MINID', before)
end
feed_done()
return {expired, trimmed, gone}
"""

#: ARGV: tag, now, n, then per entry: member, version, text?, vector?, model?.
#: Stores entries whose item is at that version, each with an ``item.indexed`` event.
#: Returns how many were stored.
SET_INDEX = r"""
local tag, now_s, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local stored = 0
for i = 1, n do
  local b = 3 + (i - 1) * 5
  local m, ver = ARGV[b + 1], ARGV[b + 2]
  local text, vec, model = opt(ARGV[b + 3]), opt(ARGV[b + 4]), opt(ARGV[b + 5])
  local ik = tag .. ':i:' .. m
  local cur = redis.call('HGET', ik, 'ver')
  if cur and tonumber(cur) == tonumber(ver) then
    redis.call('HDEL', ik, 'xv', 'xt', 'xe', 'xm')
    if text then
      local f = {'xv', ver, 'xt', text}
      if vec then f[#f + 1] = 'xe'; f[#f + 1] = vec end
      if model then f[#f + 1] = 'xm'; f[#f + 1] = model end
      redis.call('HSET', ik, unpack(f))
      redis.call('ZADD', tag .. ':idx', 0, m)
    else
      redis.call('ZREM', tag .. ':idx', m)
    end
    pend(tag, m, text, vec, model, now_s)
    local ns, key = split(m)
    emit(tag, 'item.indexed', ns, key, ver, 'hivemem', now_s)
    stored = stored + 1
  end
end
feed_done()
return stored
"""

#: KEYS: session index keys (all in the {hm:sessions} slot). ARGV: add|rem, session id.
SESSION_INDEX = r"""
for i = 1, #KEYS do
  if ARGV[1] == 'add' then
    redis.call('ZADD', KEYS[i], 0, ARGV[2])
  else
    redis.call('ZREM', KEYS[i], ARGV[2])
  end
end
return #KEYS
"""

# --- reads -----------------------------------------------------------------------------

#: KEYS: meta keys of the partitions to read. ARGV: prefix, then per key: count, start,
#: end (XRANGE ids). Per partition returns {read ts, last id, trim id, last scanned id,
#: scanned, matching entries}; read ts = max(TIME, last ts + 1): every later commit to
#: the partition gets an id with ts >= it.
READ_FEED = r"""
local prefix = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local plen = #prefix
local sub = prefix .. '/'
local out = {}
for i = 1, #KEYS do
  local mk = KEYS[i]
  local tag = string.sub(mk, 1, #mk - 5)
  local h = redis.call('HMGET', mk, 'last', 'trim')
  local r = now
  if h[1] then
    local ts = ts_of(h[1])
    if ts >= r then r = ts + 1 end
  end
  local count = tonumber(ARGV[2 + (i - 1) * 3])
  local scanned, n, found = false, 0, {}
  if count > 0 then
    local got = redis.call('XRANGE', tag .. ':feed', ARGV[3 + (i - 1) * 3],
      ARGV[4 + (i - 1) * 3], 'COUNT', count)
    n = #got
    for _, e in ipairs(got) do
      local ns = e[2][4]
      if plen == 0 or ns == prefix or string.sub(ns, 1, plen + 1) == sub then
        found[#found + 1] = e
      end
    end
    if n > 0 then scanned = got[n][1] end
  end
  out[i] = {int(r), h[1], h[2], scanned, n, found}
end
return out
"""

#: ARGV: tag, now, limit, then (min, max) ZRANGEBYLEX ranges over the partition's items.
#: Returns item records of live items, in order, at most limit.
LIST_ITEMS = r"""
local tag, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local chunk = limit + 16
for r = 4, #ARGV, 2 do
  local lo, hi = ARGV[r], ARGV[r + 1]
  while #out < limit do
    local ms = redis.call('ZRANGEBYLEX', tag .. ':keys', lo, hi, 'LIMIT', 0, chunk)
    for _, m in ipairs(ms) do
      local h = redis.call('HMGET', tag .. ':i:' .. m, unpack(ITEM))
      if live(h[2], h[6], now) then
        out[#out + 1] = item_rec(m, h)
        if #out >= limit then break end
      end
    end
    if #ms < chunk then break end
    lo = '(' .. ms[#ms]
  end
  if #out >= limit then break end
end
return out
"""

#: ARGV: tag, now, then ranges. Returns the namespaces holding a live item, in order
#: (skip scan: one live item per namespace is enough).
NAMESPACES = r"""
local tag, now = ARGV[1], tonumber(ARGV[2])
local out = {}
for r = 3, #ARGV, 2 do
  local lo, hi = ARGV[r], ARGV[r + 1]
  while true do
    local ms = redis.call('ZRANGEBYLEX', tag .. ':keys', lo, hi, 'LIMIT', 0, 1)
    if #ms == 0 then break end
    local m = ms[1]
    local ns = split(m)
    local h = redis.call('HMGET', tag .. ':i:' .. m, 'ver', 'e')
    if live(h[1], h[2], now) then
      out[#out + 1] = ns
      lo = '[' .. ns .. string.char(1)
    else
      lo = '(' .. m
    end
  end
end
return out
"""

#: ARGV: tag, namespace... Returns the number of members of each namespace in the
#: partition's key set (live or past their TTL and not yet swept).
NAMESPACE_COUNTS = r"""
local keys = ARGV[1] .. ':keys'
local out = {}
for i = 2, #ARGV do
  local ns = ARGV[i]
  out[#out + 1] = redis.call('ZLEXCOUNT', keys, '[' .. ns .. '\0', '(' .. ns .. '\1')
end
return out
"""

#: ARGV: tag, member, now, limit. Returns history records, newest first (none if the
#: item is not live).
HISTORY = r"""
local tag, m, now, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local h = redis.call('HMGET', tag .. ':i:' .. m, 'ver', 'e')
if not live(h[1], h[2], now) then return {} end
return redis.call('ZREVRANGE', tag .. ':h:' .. m, 0, limit - 1)
"""

#: ARGV: tag, number of fields, fields..., members... Returns {member, values...} per
#: member whose item exists.
FIELDS = r"""
local tag, nf = ARGV[1], tonumber(ARGV[2])
local fields = {}
for i = 1, nf do fields[i] = ARGV[2 + i] end
local out = {}
for i = 3 + nf, #ARGV do
  local m = ARGV[i]
  local h = redis.call('HMGET', tag .. ':i:' .. m, 'ver', unpack(fields))
  if h[1] then
    local row = {m}
    for j = 1, nf do row[j + 1] = h[j + 1] end
    out[#out + 1] = row
  end
end
return out
"""

#: ARGV: tag, zset (keys|idx), min, max, count, number of fields, fields...
#: Returns {member, values...} for up to count members of the range, in order.
SCAN = r"""
local tag, zs, lo, hi, count, nf = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local fields = {}
for i = 1, nf do fields[i] = ARGV[6 + i] end
local out = {}
local ms = redis.call('ZRANGEBYLEX', tag .. ':' .. zs, lo, hi, 'LIMIT', 0, count)
for _, m in ipairs(ms) do
  local row = {m}
  if nf > 0 then
    local h = redis.call('HMGET', tag .. ':i:' .. m, unpack(fields))
    for j = 1, nf do row[j + 1] = h[j] end
  end
  out[#out + 1] = row
end
return out
"""

#: ARGV: tag, now, model?, limit, min. Returns {records of live items whose index entry
#: is missing, stale or without a vector by model (at most limit), where to resume
#: (a ZRANGEBYLEX min) or false when the partition was scanned to its end}.
UNINDEXED = r"""
local tag, now, model = ARGV[1], tonumber(ARGV[2]), opt(ARGV[3])
local limit, lo = tonumber(ARGV[4]), ARGV[5]
local out = {}
local scanned = 0
while true do
  local ms = redis.call('ZRANGEBYLEX', tag .. ':keys', lo, '+', 'LIMIT', 0, 200)
  for _, m in ipairs(ms) do
    local ik = tag .. ':i:' .. m
    local x = redis.call('HMGET', ik, 'ver', 'e', 'xv', 'xm')
    if live(x[1], x[2], now) and ((not x[3]) or x[3] ~= x[1] or
        (model and ((not x[4]) or x[4] ~= model or redis.call('HEXISTS', ik, 'xe') == 0))) then
      out[#out + 1] = item_rec(m, redis.call('HMGET', ik, unpack(ITEM)))
      if #out >= limit then return {out, false} end
    end
  end
  if #ms < 200 then return {out, false} end
  lo = '(' .. ms[#ms]
  scanned = scanned + #ms
  if scanned >= 2000 then return {out, lo} end
end
"""

#: ARGV: tag, now, model, limit. Returns records of live items of the partition whose
#: index entry waits for a vector by ``model``, longest waiting first. Members that no
#: longer wait (the item is gone or expired, or its entry has a vector or is of another
#: version) leave the set on the way; entries of another model stay.
PENDING = r"""
local tag, now, model, limit = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local out, seen, dead = {}, 0, {}
local ms = redis.call('ZRANGE', tag .. ':pend', 0, 4 * limit - 1)
for _, m in ipairs(ms) do
  if #out >= limit then break end
  local ik = tag .. ':i:' .. m
  local x = redis.call('HMGET', ik, 'ver', 'e', 'xv', 'xm')
  if not live(x[1], x[2], now) or x[3] ~= x[1] or redis.call('HEXISTS', ik, 'xe') == 1 then
    dead[#dead + 1] = m
  elseif x[4] == model then
    out[#out + 1] = item_rec(m, redis.call('HMGET', ik, unpack(ITEM)))
  end
end
if #dead > 0 then redis.call('ZREM', tag .. ':pend', unpack(dead)) end
return out
"""

#: ARGV: tag, now, model. Returns {entries waiting for a vector by ``model`` among the
#: partition's longest-waiting 1,000 (plus every later member, uncounted), the write
#: time of the oldest of them or false}. Members that no longer wait are skipped.
PENDING_COUNT = r"""
local tag, now, model = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local ms = redis.call('ZRANGE', tag .. ':pend', 0, 999, 'WITHSCORES')
local count, oldest = 0, false
for i = 1, #ms, 2 do
  local ik = tag .. ':i:' .. ms[i]
  local x = redis.call('HMGET', ik, 'ver', 'e', 'xv', 'xm')
  if live(x[1], x[2], now) and x[3] == x[1] and x[4] == model
      and redis.call('HEXISTS', ik, 'xe') == 0 then
    count = count + 1
    if not oldest then oldest = ms[i + 1] end
  end
end
local total = redis.call('ZCARD', tag .. ':pend')
if total > 1000 then
  count = count + total - 1000
  if not oldest then oldest = redis.call('ZRANGE', tag .. ':pend', 1000, 1000, 'WITHSCORES')[2] end
end
return {count, oldest}
"""

#: ARGV: tag, now. Returns the number of live items of the partition.
COUNT = r"""
local tag, now = ARGV[1], ARGV[2]
return redis.call('ZCARD', tag .. ':keys') - redis.call('ZCOUNT', tag .. ':exp', '-inf', now)
"""

#: ARGV: tag, id, after, limit, now. Returns {'ok', message records...} or {'notfound'}
#: (absent or expired at now).
READ_MESSAGES = r"""
local tag, sid, after, limit, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local h = redis.call('HMGET', tag .. ':s:' .. sid, 'last_activity_at', 'ttl')
if not h[1] or session_expired(h[1], h[2], now) then return {'notfound'} end
local rows = redis.call('ZRANGEBYSCORE', tag .. ':msg:' .. sid, '(' .. after, '+inf',
  'LIMIT', 0, limit)
return {'ok', rows}
"""

WRITE_SCRIPTS = {
    "write_items": _APPLY + WRITE_ITEMS,
    "put_group": _APPLY + PUT_GROUP,
    "create_session": CREATE_SESSION,
    "append_messages": APPEND_MESSAGES,
    "save_state": SAVE_STATE,
    "delete_session": DELETE_SESSION,
    "publish": PUBLISH,
    "bind_request": BIND_REQUEST,
    "sweep": SWEEP,
    "set_index": SET_INDEX,
    "pending": PENDING,
    "session_index": SESSION_INDEX,
    **TASK_WRITE_SCRIPTS,
}
READ_SCRIPTS = {
    "read_feed": READ_FEED,
    "list_items": LIST_ITEMS,
    "namespaces": NAMESPACES,
    "namespace_counts": NAMESPACE_COUNTS,
    "history": HISTORY,
    "fields": FIELDS,
    "scan": SCAN,
    "unindexed": UNINDEXED,
    "pending_count": PENDING_COUNT,
    "count": COUNT,
    "read_messages": READ_MESSAGES,
    **TASK_READ_SCRIPTS,
}


def source(name: str) -> str:
    """The full Lua source of script ``name``: shebang, helpers, body. Write scripts are
    plain ``#!lua`` (refused up front when the server is out of memory, so they never
    stop half way); read scripts are ``flags=no-writes``. Task scripts (see
    :mod:`.task_scripts`) also get the task helpers."""
    if name in TASK_WRITE_SCRIPTS:
        helpers = _COMMON + _WRITE + TASK_READ_HELPERS + TASK_WRITE_HELPERS
        return "#!lua\n" + helpers + TASK_WRITE_SCRIPTS[name]
    if name in TASK_READ_SCRIPTS:
        return "#!lua flags=no-writes\n" + _COMMON + TASK_READ_HELPERS + TASK_READ_SCRIPTS[name]
    if name in WRITE_SCRIPTS:
        return "#!lua\n" + _COMMON + _WRITE + WRITE_SCRIPTS[name]
    return "#!lua flags=no-writes\n" + _COMMON + READ_SCRIPTS[name]
