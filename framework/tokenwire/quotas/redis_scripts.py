"""The Lua scripts of the Redis quota store: each check-and-take runs atomically in
Redis, on Redis's own clock (``TIME``). See :mod:`tokenwire.quotas.redis`."""

from __future__ import annotations

__all__ = [
    "ACQUIRE",
    "ADMIT",
    "BUDGET_CHARGE",
    "BUDGET_SETTLE",
    "IN_USE",
    "NOW",
    "RENEW",
    "SETTLE",
    "STAGES",
    "TAKE",
    "USED",
]

NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
"""

# Shared by TAKE and ADMIT: check `count` rate keys from KEYS[first + 1], their limit
# and window (ms) pairs from ARGV[at]; `apply` stores the new marks.
_BUCKETS = """
local function check(first, count, cost, at)
  local marks, violated, worst = {}, {}, 0
  for i = 1, count do
    local limit, window = tonumber(ARGV[at + 2 * i - 2]), tonumber(ARGV[at + 2 * i - 1])
    local need = cost * window / limit
    local tat = tonumber(redis.call('GET', KEYS[first + i])) or now
    if tat < now then tat = now end
    local excess = tat + need - now - window
    if need > window + 1e-6 then excess = math.huge end
    if excess > 1e-6 then
      violated[#violated + 1] = i
      if excess > worst then worst = excess end
    end
    marks[i] = tat + need
  end
  return marks, violated, worst
end
local function apply(first, marks)
  for i, mark in ipairs(marks) do
    local ttl_ms = string.format('%d', math.ceil(mark - now) + 1000)
    redis.call('SET', KEYS[first + i], string.format('%.3f', mark), 'PX', ttl_ms)
  end
end
local function refuse(stage, violated, worst)
  local out = {stage, string.format('%.6f', worst)}
  for _, i in ipairs(violated) do out[#out + 1] = i end
  return out
end
"""

# KEYS: rate keys. ARGV: cost, then limit and window (ms) per key.
# Returns {1, '0', mark...} or {0, excess_ms, violated index (1-based)...}.
TAKE = (
    NOW
    + _BUCKETS
    + """
local marks, violated, worst = check(0, #KEYS, tonumber(ARGV[1]), 2)
if #violated > 0 then return refuse(0, violated, worst) end
apply(0, marks)
local out = {1, '0'}
for _, mark in ipairs(marks) do out[#out + 1] = string.format('%.3f', mark) end
return out
"""
)

# KEYS: rate keys. ARGV: diff (actual - reserved), then limit, window (ms), mark per key.
SETTLE = (
    NOW
    + """
local diff = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local limit, window = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local mark = tonumber(ARGV[3 * i + 1])
  local interval = window / limit
  local tat = tonumber(redis.call('GET', key))
  if diff < 0 then
    if tat then
      local back, left = -diff * interval, mark - now
      if left < 0 then left = 0 end
      if back > left then back = left end
      tat = tat - back
    end
  else
    if not tat or tat < now then tat = now end
    tat = tat + diff * interval
  end
  if tat and tat > now then
    local ttl = string.format('%d', math.ceil(tat - now) + 1000)
    redis.call('SET', key, string.format('%.3f', tat), 'PX', ttl)
  elseif tat then
    redis.call('DEL', key)
  end
end
return 1
"""
)

# KEYS: slot keys. ARGV: lease id, ttl (ms), then limit per key.
# Returns {1} or {0, violated index (1-based)...}.
ACQUIRE = (
    NOW
    + """
local violated = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.3f', now))
  if redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then violated[#violated + 1] = i end
end
if #violated > 0 then
  local out = {0}
  for _, i in ipairs(violated) do out[#out + 1] = i end
  return out
end
local ttl = tonumber(ARGV[2])
local expiry = string.format('%.3f', now + ttl)
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, expiry, ARGV[1])
  redis.call('PEXPIRE', key, string.format('%d', ttl + 1000))
end
return {1}
"""
)

# A turn's admission. KEYS: slot keys, request rate keys, token rate keys.
# ARGV: slot count, request count, token count, lease id, ttl (ms), a limit per slot,
# limit and window (ms) per request rate, the token amount, limit and window per token rate.
# Returns {0, '0', token mark...} (admitted), or {stage, excess_ms, violated index
# (1-based, within the stage)...}: stage 1 slots, 2 requests, 3 tokens.
ADMIT = (
    NOW
    + _BUCKETS
    + """
local ns, nr, nt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, ttl = ARGV[4], tonumber(ARGV[5])
local a = 6
local busy = {}
for i = 1, ns do
  local key = KEYS[i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.3f', now))
  if redis.call('ZCARD', key) >= tonumber(ARGV[a + i - 1]) then busy[#busy + 1] = i end
end
if #busy > 0 then
  local out = {1, '0'}
  for _, i in ipairs(busy) do out[#out + 1] = i end
  return out
end
a = a + ns
local rmarks, rviolated, rworst = check(ns, nr, 1, a)
if #rviolated > 0 then return refuse(2, rviolated, rworst) end
a = a + 2 * nr
local amount = tonumber(ARGV[a])
local tmarks, tviolated, tworst = check(ns + nr, nt, amount, a + 1)
apply(ns, rmarks)
if #tviolated > 0 then return refuse(3, tviolated, tworst) end
apply(ns + nr, tmarks)
local expiry = string.format('%.3f', now + ttl)
for i = 1, ns do
  redis.call('ZADD', KEYS[i], expiry, lease)
  redis.call('PEXPIRE', KEYS[i], string.format('%d', ttl + 1000))
end
local out = {0, '0'}
for _, mark in ipairs(tmarks) do out[#out + 1] = string.format('%.3f', mark) end
return out
"""
)
STAGES = {1: "streams", 2: "requests", 3: "tokens"}

# KEYS: slot keys. ARGV: ttl (ms), then per key: a count and that many lease ids.
RENEW = (
    NOW
    + """
local ttl = tonumber(ARGV[1])
local expiry = string.format('%.3f', now + ttl)
local pos = 2
for _, key in ipairs(KEYS) do
  local count = tonumber(ARGV[pos])
  for j = 1, count do
    redis.call('ZADD', key, 'XX', expiry, ARGV[pos + j])
  end
  pos = pos + count + 1
  redis.call('PEXPIRE', key, string.format('%d', ttl + 1000))
end
return 1
"""
)

# KEYS[1]: a rate key. ARGV: limit, window (ms). Returns the units in the bucket.
USED = (
    NOW
    + """
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat <= now then return '0' end
return string.format('%.6f', (tat - now) * tonumber(ARGV[1]) / tonumber(ARGV[2]))
"""
)

# KEYS[1]: a slot key. Returns the live leases.
IN_USE = NOW + "return redis.call('ZCOUNT', KEYS[1], string.format('(%.3f', now), '+inf')"

# A budget's charge. KEYS[1]: the period's counter. ARGV: limit, amount, expiry (unix ms,
# the period's end). Returns {1, units after} or {0, units now} (refused, nothing added).
BUDGET_CHARGE = """
local used = tonumber(redis.call('GET', KEYS[1])) or 0
if used + tonumber(ARGV[2]) > tonumber(ARGV[1]) then return {0, used} end
used = redis.call('INCRBY', KEYS[1], ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return {1, used}
"""

# A budget's settlement. KEYS[1]: the period's counter. ARGV: actual - charged.
# A counter already gone (its period is over) stays gone; none goes below 0.
BUDGET_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local used = redis.call('INCRBY', KEYS[1], ARGV[1])
  if used < 0 then redis.call('INCRBY', KEYS[1], -used) end
end
return 1
"""
