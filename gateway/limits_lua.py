"""The Lua scripts behind the Redis-shared limits (`limits_redis.py`).

Each step of a request's admission is one script, so it runs atomically inside Redis: no
replica can read a level between another's read and write. Time is Redis's own (`TIME`), so
replicas with skewed clocks share one clock. A key's Redis keys share the hash tag `{<key id>}`
(one cluster slot):

- `tk:{id}:rpm`, `tk:{id}:tpm`: token buckets as in `ratelimit.TokenBucket` (fields `l` level,
  `t` time, `c` capacity), expiring once they would be full again;
- `tk:{id}:lease`: a sorted set of the requests in flight, scored by when their lease ends
  (a replica renews its own; a crashed replica's expire, and with them their holds);
- `tk:{id}:held`: each request's hold of the budget (`"<tokens> <usd>"`) and their sums `#t`,
  `#u`;
- `tk:{id}:lapsed`: the requests whose hold went with their lease (`purge`) before their end
  came: an end sent again after an outage longer than a lease still counts (`FINISH`);
- `tk:{id}:spent:<period start>`: tokens `t` and USD `u` spent in the period, seeded from the
  usage table when absent.

The leases and holds live for `KEEP_SECONDS` past their last touch, not for a lease: a
lapsed hold stays until a script purges it (and notes it in `lapsed`), so an end held back
by an outage of up to that long finds its hold, or its note, when it is sent again.

Numbers go back to Python as strings: Redis turns a Lua float into an integer.
"""

from __future__ import annotations

__all__ = ["ADOPT", "CHARGE", "ENTER", "FINISH", "KEEP_SECONDS", "READ", "RENEW", "SEED"]

# How long a key's leases, holds and lapsed notes outlive their last touch (a day): ends held
# back by an outage up to this long still count when they are sent again.
KEEP_SECONDS = 86400

_KEEP = f"""
local KEEP = {KEEP_SECONDS}
local function keep(lease) return math.max(math.ceil(lease) * 2, KEEP) end
"""

_COMMON = (
    _KEEP
    + """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- The bucket's level at time t for a capacity of cap per minute; a changed capacity keeps the
-- level (refilled at the old rate), as `Limiter` does.
local function level(key, cap, t)
  local v = redis.call('HMGET', key, 'l', 't', 'c')
  if not v[1] then return cap end
  local old = tonumber(v[3])
  local l = tonumber(v[1]) + math.max(0, t - tonumber(v[2])) * old / 60
  if l > old then l = old end
  if l > cap then l = cap end
  return l
end

local function store(key, cap, l, t)
  redis.call('HSET', key, 'l', tostring(l), 't', tostring(t), 'c', tostring(cap))
  redis.call('EXPIRE', key, math.ceil((cap - l) * 60 / cap) + 2)
end

local function release(held, m)
  local v = redis.call('HGET', held, m)
  if not v then return end
  local sp = string.find(v, ' ')
  redis.call('HINCRBY', held, '#t', -tonumber(string.sub(v, 1, sp - 1)))
  redis.call('HINCRBYFLOAT', held, '#u', -tonumber(string.sub(v, sp + 1)))
  redis.call('HDEL', held, m)
  if redis.call('HLEN', held) <= 2 then  -- no hold left: clear the sums' float dust
    redis.call('DEL', held)
  end
  return true
end

-- Requests whose lease ended (their replica died, or lost Redis): they leave, and their holds
-- go, noted in `lapsed` (an end sent again later counts what it used: FINISH).
local function purge(lease, held, lapsed, t)
  local gone = redis.call('ZRANGEBYSCORE', lease, '-inf', t)
  local noted = false
  for _, m in ipairs(gone) do
    if release(held, m) then
      redis.call('HSET', lapsed, m, '1')
      noted = true
    end
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', lease, '-inf', t) end
  if noted then redis.call('EXPIRE', lapsed, KEEP) end
end

local function refund(key, cap, t)
  if cap > 0 then store(key, cap, math.min(cap, level(key, cap, t) + 1), t) end
end
"""
)

# KEYS: rpm, lease, held, lapsed. ARGV: rpm (0: none), max concurrency (0: none), ticket, lease s.
# -> {'ok', rpm level} | {'slots'} | {'rate', wait s, rpm level}
ENTER = (
    _COMMON
    + """
local t = now()
local cap, maxc, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
purge(KEYS[2], KEYS[3], KEYS[4], t)
if maxc > 0 and redis.call('ZCARD', KEYS[2]) >= maxc then return {'slots'} end
local l = -1
if cap > 0 then
  l = level(KEYS[1], cap, t)
  if l < 1 then return {'rate', tostring((1 - l) * 60 / cap), tostring(l)} end
  l = l - 1
  store(KEYS[1], cap, l, t)
end
if maxc > 0 then
  redis.call('ZADD', KEYS[2], t + lease, ARGV[3])
  redis.call('EXPIRE', KEYS[2], keep(lease))
end
return {'ok', tostring(l)}
"""
)

# KEYS: rpm, tpm, lease, held, spent, lapsed. ARGV: rpm, tpm (0: none), likely tokens, most tokens,
# budget tokens, budget USD ('' : none), likely USD, most USD, ticket, lease s.
# -> {'ok', tpm level} | {'seed'} | {'budget', tokens left, USD left} | {'tokens', wait, level}
CHARGE = (
    _COMMON
    + """
local t = now()
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local likely, most = tonumber(ARGV[3]), tonumber(ARGV[4])
local budgeted = ARGV[5] ~= '' or ARGV[6] ~= ''
local lease = tonumber(ARGV[10])
if budgeted then
  local s = redis.call('HMGET', KEYS[5], 't', 'u')
  if not s[1] then return {'seed'} end
  purge(KEYS[3], KEYS[4], KEYS[6], t)
  local h = redis.call('HMGET', KEYS[4], '#t', '#u')
  local held_t, held_u = tonumber(h[1] or '0'), math.max(0, tonumber(h[2] or '0'))
  local left_t, left_u = 0, 0
  local over = false
  if ARGV[5] ~= '' then
    left_t = tonumber(ARGV[5]) - tonumber(s[1]) - held_t
    over = over or likely > left_t
  end
  if ARGV[6] ~= '' then
    left_u = tonumber(ARGV[6]) - tonumber(s[2]) - held_u
    over = over or tonumber(ARGV[7]) > left_u
  end
  if over then
    refund(KEYS[1], rpm, t)
    return {'budget', tostring(left_t), tostring(left_u)}
  end
end
local l = -1
if tpm > 0 then
  l = level(KEYS[2], tpm, t)
  if l < likely then
    refund(KEYS[1], rpm, t)
    return {'tokens', tostring((likely - l) * 60 / tpm), tostring(l)}
  end
  l = l - most
  store(KEYS[2], tpm, l, t)
end
if budgeted then
  redis.call('HSET', KEYS[4], ARGV[9], ARGV[4] .. ' ' .. ARGV[8])
  redis.call('HINCRBY', KEYS[4], '#t', most)
  redis.call('HINCRBYFLOAT', KEYS[4], '#u', ARGV[8])
  redis.call('EXPIRE', KEYS[4], keep(lease))
  redis.call('ZADD', KEYS[3], t + lease, ARGV[9])
  redis.call('EXPIRE', KEYS[3], keep(lease))
end
return {'ok', tostring(l)}
"""
)

# KEYS: tpm, lease, held, spent, lapsed. ARGV: ticket, tpm (0: none), held tokens, used
# tokens, used USD, charged ('1'/'0'), again ('1': sent again after a failure). The request
# ended: its slot, hold and unused tokens come back, and what it used counts (when the period's
# spending is known here; else it is seeded later from the usage table, which has this
# request's row). An end sent again may have run the first time (Redis ran it, its answer was
# lost): it counts only if its hold is still there, which its first run released, or went
# with its lease before any run of its end (noted in `lapsed`, which every run clears).
FINISH = (
    _COMMON
    + """
local t = now()
local tpm = tonumber(ARGV[2])
-- Always: a request cancelled while its charge ran may hold budget it never heard of.
local held = release(KEYS[3], ARGV[1])
if not held and redis.call('HDEL', KEYS[5], ARGV[1]) == 1 then held = true end
if ARGV[6] == '1' and (ARGV[7] ~= '1' or held) then
  if tpm > 0 then
    local l = level(KEYS[1], tpm, t)
    store(KEYS[1], tpm, math.min(tpm, l + tonumber(ARGV[3]) - tonumber(ARGV[4])), t)
  end
  if redis.call('EXISTS', KEYS[4]) == 1 then
    redis.call('HINCRBY', KEYS[4], 't', ARGV[4])
    redis.call('HINCRBYFLOAT', KEYS[4], 'u', ARGV[5])
  end
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
)

# KEYS: spent. ARGV: tokens, USD, TTL s (0: none). Seeds a period's spending once.
SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 't', ARGV[1], 'u', ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# KEYS: lease. ARGV: lease s, tickets... Requests already running when their key was given a
# concurrency limit count in flight from now on (those counted already keep their lease).
ADOPT = (
    _KEEP
    + """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'NX', until_, ARGV[i]) end
redis.call('EXPIRE', KEYS[1], keep(tonumber(ARGV[1])))
return 1
"""
)

# KEYS: lease, held. ARGV: lease s, tickets... The replica is alive: its requests keep their
# slots and holds for another lease.
RENEW = (
    _KEEP
    + """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i]) end
redis.call('EXPIRE', KEYS[1], keep(tonumber(ARGV[1])))
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('EXPIRE', KEYS[2], keep(tonumber(ARGV[1])))
end
return 1
"""
)

# KEYS: spent, lease, held, lapsed. -> {spent tokens, spent USD, held tokens, held USD} (each
# false where absent). The admin API's read: lapsed holds (a crashed replica's) purged first.
READ = (
    _COMMON
    + """
purge(KEYS[2], KEYS[3], KEYS[4], now())
local s = redis.call('HMGET', KEYS[1], 't', 'u')
local h = redis.call('HMGET', KEYS[3], '#t', '#u')
return {s[1], s[2], h[1], h[2]}
"""
)
