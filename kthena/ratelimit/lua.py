"""
The Lua the Redis buckets run (L{kthena.ratelimit.redis}): one script per check, one per
settle, one to read levels for the debug view; each refills with Redis's own C{TIME} and
keeps Kthena's hash layout (C{tokens}, C{last_update}) at Kthena's keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end -- TIME, then writes (< 5.0)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function fmt(x) return string.format('%.17g', x) end -- tostring keeps 14 digits
local function level(key, capacity, rate)
  local kept = redis.call('HMGET', key, 'tokens', 'last_update')
  local tokens = tonumber(kept[1])
  if tokens == nil then return capacity, false end
  local elapsed = math.max(0, now - (tonumber(kept[2]) or now))
  return math.min(capacity, tokens + elapsed * rate), true
end
local args = {} -- ARGV[1]: every number of the call, separated by spaces (one argument to
for v in string.gmatch(ARGV[1], '%S+') do args[#args + 1] = v end -- encode, not dozens)
local function store(key, tokens, expire)
  redis.call('HSET', key, 'tokens', fmt(tokens), 'last_update', fmt(now))
  redis.call('EXPIRE', key, expire)
end
"""

_CHECK = """
-- args, five per key: capacity, per second, take, need, expire. Refused: {index, level}.
local levels = {}
for i, key in ipairs(KEYS) do
  local a = (i - 1) * 5
  levels[i] = level(key, tonumber(args[a + 1]), tonumber(args[a + 2]))
  if levels[i] < tonumber(args[a + 4]) then return {i - 1, fmt(levels[i])} end
end
for i, key in ipairs(KEYS) do
  local a = (i - 1) * 5
  local take = tonumber(args[a + 3])
  if take ~= 0 then store(key, levels[i] - take, args[a + 5]) end
end
return false
"""

_SETTLE = """
-- args, four per key: capacity, per second, amount (a charge > 0, a refund < 0), expire.
for i, key in ipairs(KEYS) do
  local a = (i - 1) * 4
  local capacity = tonumber(args[a + 1])
  local tokens = level(key, capacity, tonumber(args[a + 2]))
  store(key, math.min(capacity, tokens - tonumber(args[a + 3])), args[a + 4])
end
return false
"""

_LEVELS = """
-- args, two per key: capacity, per second. Writes nothing; nil for a bucket never used.
local out = {}
for i, key in ipairs(KEYS) do
  local tokens, kept = level(key, tonumber(args[2 * i - 1]), tonumber(args[2 * i]))
  out[i] = kept and fmt(tokens) or false
end
return out
"""


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1, the name EVALSHA calls it by."""

    text: str
    sha: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest().encode())


CHECK = Script(_PRELUDE + _CHECK)
SETTLE = Script(_PRELUDE + _SETTLE)
LEVELS = Script(_PRELUDE + _LEVELS)
SCRIPTS = (CHECK, SETTLE, LEVELS)
