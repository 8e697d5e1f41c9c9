"""The Lua scripts of the Redis abuse store: each runs atomically in Redis, on Redis's
own clock (``TIME``, in milliseconds). See :mod:`tokenwire.abuse.redis`.

An account has three keys, which share its tenant's hash tag: ``flags`` (a sorted
set, member a flag id, score its time), ``suspension`` (a hash: reason, since,
until; it expires with a timed suspension) and ``throttle`` (the throttle bucket's
TAT). Every script that reads a standing returns it as
``{flags, suspended (0/1), reason, since_ms, until_ms}``.
"""

from __future__ import annotations

__all__ = ["ADMIT_TURN", "LIFT", "POLICIES", "RECORD", "SET_POLICY", "STANDING"]

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Shared: drop flags older than the window (ARGV[1], ms) and read the standing.
_STANDING = """
local function count(key, window)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  return redis.call('ZCARD', key)
end
local function standing(flags, suspension)
  local s = redis.call('HMGET', suspension, 'reason', 'since', 'until')
  if not s[1] then return {flags, 0, '', 0, 0} end
  return {flags, 1, s[1], tonumber(s[2]), tonumber(s[3])}
end
"""

# Count one flag. KEYS: flags, suspension. ARGV: window (ms), flag id, most flags kept,
# suspend_after (0: never), suspension length (ms; 0: until lifted), the suspension
# reason's prefix and suffix (the count goes between them).
RECORD = (
    _NOW
    + _STANDING
    + """
local window = tonumber(ARGV[1])
count(KEYS[1], window)
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[3]) - 1)
redis.call('PEXPIRE', KEYS[1], window)
local flags = redis.call('ZCARD', KEYS[1])
local after, length = tonumber(ARGV[4]), tonumber(ARGV[5])
if after > 0 and flags >= after and redis.call('EXISTS', KEYS[2]) == 0 then
  local untl = 0
  if length > 0 then untl = now + length end
  redis.call('HSET', KEYS[2], 'reason', ARGV[6] .. flags .. ARGV[7], 'since', now, 'until', untl)
  if length > 0 then redis.call('PEXPIRE', KEYS[2], length) end
end
return standing(flags, KEYS[2])
"""
)

# KEYS: flags, suspension. ARGV: window (ms).
STANDING = (
    _NOW
    + _STANDING
    + """
return standing(count(KEYS[1], tonumber(ARGV[1])), KEYS[2])
"""
)

# A turn of a throttled account. KEYS: flags, suspension, throttle. ARGV: window (ms),
# throttle_after (0: never), turns per throttle window, throttle window (ms).
# Returns the standing and, last, the ms until a turn fits (0: one was taken).
ADMIT_TURN = (
    _NOW
    + _STANDING
    + """
local out = standing(count(KEYS[1], tonumber(ARGV[1])), KEYS[2])
local after = tonumber(ARGV[2])
if out[2] == 1 or after == 0 or out[1] < after then
  out[6] = 0
  return out
end
local turns, window = tonumber(ARGV[3]), tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[3])) or now
if tat < now then tat = now end
tat = tat + window / turns
local excess = tat - now - window
if excess > 0 then
  out[6] = string.format('%d', math.ceil(excess))
  return out
end
local ttl = string.format('%d', math.ceil(tat - now) + 1000)
redis.call('SET', KEYS[3], string.format('%.3f', tat), 'PX', ttl)
out[6] = 0
return out
"""
)

# KEYS: flags, suspension, throttle. ARGV: window (ms). The standing before; then all gone.
LIFT = (
    _NOW
    + _STANDING
    + """
local out = standing(count(KEYS[1], tonumber(ARGV[1])), KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return out
"""
)

# KEYS: the policies hash, its version counter. ARGV: the version the caller knows.
# Returns {version} when unchanged, else {version, tenant, policy, tenant, policy...}.
POLICIES = """
local version = tonumber(redis.call('GET', KEYS[2])) or 0
if version == tonumber(ARGV[1]) then return {version} end
local out = {version}
for _, item in ipairs(redis.call('HGETALL', KEYS[1])) do out[#out + 1] = item end
return out
"""

# KEYS: the policies hash, its version counter. ARGV: tenant, policy (JSON; empty:
# remove). Returns the new version.
SET_POLICY = """
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return redis.call('INCR', KEYS[2])
"""
