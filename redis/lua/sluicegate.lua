#!lua name=sluicegate_v2
-- sluicegate's Redis functions (SPEC §11, many hosts). One hash per scope holds its four buckets;
-- replicas lease shares of them and give back what they did not use. Only bucket and lease
-- arithmetic lives here: adaptation keeps its one implementation, the Rust one.
--
-- The version is in the library's and the functions' names. A replica loads this file with
-- FUNCTION LOAD REPLACE, and again whenever Redis answers that a function is missing (a restart
-- that lost its data, a FUNCTION FLUSH).
--
-- A bucket is kept as a debt in µs, as the engine keeps it: a request of n units costs
-- n × interval (µs per unit), the debt drains at one µs per µs, and a bucket with a debt over
-- `window` is over its limit, over `hard` it refuses. Lua numbers are doubles: µs since the epoch
-- (~1.8e15) are exact in them.

-- A number read from the hash or the arguments, or `default` if it is not a finite number:
-- a damaged field never stops a scope, and never lets it admit more.
local function num(text, default)
  local n = tonumber(text)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then
    return default
  end
  return n
end

local function clock(given)
  if given ~= '' then
    return num(given, 0)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- KEYS[1]: the scope's hash. KEYS[2]: the set of every scope's hash, which the leader ticks.
-- ARGV[1]: the caller's clock in µs, or '' for Redis TIME (the caller's clock is for tests that
--          run hours of adaptation in seconds).
-- ARGV[2]: window, µs. ARGV[3]: hard, µs (window × the policy's hard factor).
-- ARGV[4]: how long an untouched hash lives, ms.
-- ARGV[5]: the caller: a replica's lease of this scope, named once per lease it starts.
-- ARGV[6]: the caller's call number, rising. A call whose number is not above the last one
--          applied (a call that timed out, then arrived late) changes nothing and grants nothing.
-- ARGV[7]: 1 if the caller is done: its counts here are deleted after this call.
-- Then per metric m = 0..3, five arguments from ARGV[8 + 5m]:
--   interval  µs per unit of the metric's limit (0: not limited), used while the hash has none;
--   sent      every correction the caller has ever sent, summed: positive charges usage beyond
--             what was leased, negative gives back (unused leases, refunds). What this hash has
--             not applied of it yet is applied now, so a call that timed out is made good by the
--             next, never counted twice. A refund stops at a full bucket;
--   received  every unit the caller has received in answers, summed: what was granted beyond
--             it was lost with an answer that never arrived, and goes back into the bucket;
--   need      the least grant worth having: unless every limited metric can grant its need,
--             nothing is granted (a lease is all-or-nothing across metrics);
--   want      what the replica would like, sized from its recent rate.
-- ARGV[28]: 1 if the caller has had an answer before. A hash that no longer knows such a caller
--          (untouched for `ttl`, or the caller swept for being silent that long) would apply
--          its whole sums again: the call changes nothing and answers { now, 2 } ("forgotten"),
--          and the caller starts again under a new name.
-- The hash also counts, per metric, the net units used ('u0'..'u3'): granted and received, less
-- given back, plus charged.
-- Returns { now, over, then per metric: grant, debt (µs, after), interval (ns per unit) }; `over`
-- is 1 when some bucket is past its window, so what was granted runs over its limit.
--
-- Each caller's last call is kept ('s:' .. caller). Callers silent for `ttl` are forgotten, as
-- the whole hash would be if the scope were idle that long: a crashed replica's sums do not stay
-- forever in a scope that never is. Looked for at most once a second of the hash's clock, a
-- page of the hash at a time.
local function sweep(key, now, ttl_us)
  if now - num(redis.call('HGET', key, 'swept'), 0) < 1000000 then
    return
  end
  local page = redis.call('HSCAN', key, redis.call('HGET', key, 'cursor') or '0', 'MATCH', 's:*', 'COUNT', 100)
  for i = 1, #page[2], 2 do
    -- A damaged time reads as long ago: the caller is forgotten, and told so if it calls again.
    if now - num(page[2][i + 1], 0) > ttl_us then
      local caller = string.sub(page[2][i], 3)
      redis.call('HDEL', key, 's:' .. caller, 'q:' .. caller)
      for m = 0, 3 do
        redis.call('HDEL', key, 'c' .. m .. ':' .. caller, 'g' .. m .. ':' .. caller)
      end
    end
  end
  redis.call('HSET', key, 'swept', now, 'cursor', page[1])
end

local function lease(keys, args)
  local key = keys[1]
  local now = clock(args[1])
  local window = num(args[2], 0)
  local hard = num(args[3], window)
  local ttl = math.floor(num(args[4], 3600000))
  local caller = args[5]
  local seq = num(args[6], 0)
  local done = args[7] == '1'
  local last = num(redis.call('HGET', key, 't'), now)
  local elapsed = now - last
  if elapsed < 0 then
    elapsed = 0
  end
  local last_seq = redis.call('HGET', key, 'q:' .. caller)
  if last_seq == false and args[28] == '1' then
    return { now, 2 }
  end
  local fresh = seq > num(last_seq, 0)
  local debt, interval, sent, received, need, want = {}, {}, {}, {}, {}, {}
  local fits = fresh
  for m = 0, 3 do
    local at = 8 + 5 * m
    local fields = redis.call('HMGET', key, 'd' .. m, 'i' .. m, 'c' .. m .. ':' .. caller, 'g' .. m .. ':' .. caller)
    interval[m] = num(fields[2], num(args[at], 0))
    if interval[m] < 0 then
      interval[m] = 0
    end
    -- A missing debt is a full bucket; a damaged one is an empty bucket, which refills.
    local d = hard
    if fields[1] == false then
      d = 0
    else
      d = num(fields[1], hard)
    end
    sent[m] = math.floor(num(args[at + 1], 0))
    received[m] = math.floor(num(args[at + 2], 0))
    local change = 0
    if fresh then
      local lost = math.max(0, num(fields[4], 0) - received[m])
      change = sent[m] - num(fields[3], 0) - lost
    end
    d = d - elapsed + change * interval[m]
    if d < 0 then
      d = 0
    end
    debt[m] = d
    if change ~= 0 then
      redis.call('HINCRBY', key, 'u' .. m, change)
    end
    need[m] = math.max(0, math.floor(num(args[at + 3], 0)))
    want[m] = math.max(need[m], math.floor(num(args[at + 4], 0)))
    if interval[m] > 0 and math.floor((hard - d) / interval[m]) < need[m] then
      fits = false
    end
  end
  local answer = { now, 0 }
  local over = 0
  for m = 0, 3 do
    local grant = 0
    if fits and interval[m] > 0 then
      local available = math.floor((hard - debt[m]) / interval[m])
      -- A quarter of the bucket while it is at least half full, a quarter of what is left after.
      local cap = math.floor(window / interval[m] / 4)
      if debt[m] > window / 2 then
        cap = math.floor(available / 4)
      end
      grant = math.min(available, math.max(need[m], math.min(want[m], cap)))
      debt[m] = debt[m] + grant * interval[m]
      redis.call('HINCRBY', key, 'u' .. m, grant)
    end
    if interval[m] > 0 and debt[m] > window then
      over = 1
    end
    redis.call('HSET', key, 'd' .. m, debt[m], 'i' .. m, interval[m])
    if fresh then
      redis.call('HSET', key, 'c' .. m .. ':' .. caller, sent[m], 'g' .. m .. ':' .. caller, received[m] + grant)
    end
    answer[3 + 3 * m] = grant
    answer[4 + 3 * m] = math.floor(debt[m])
    answer[5 + 3 * m] = math.floor(interval[m] * 1000)
  end
  answer[2] = over
  if fresh then
    redis.call('HSET', key, 'q:' .. caller, seq)
  end
  redis.call('HSET', key, 's:' .. caller, now)
  if done then
    redis.call('HDEL', key, 'q:' .. caller, 's:' .. caller)
    for m = 0, 3 do
      redis.call('HDEL', key, 'c' .. m .. ':' .. caller, 'g' .. m .. ':' .. caller)
    end
  end
  redis.call('HSET', key, 't', now)
  sweep(key, now, ttl * 1000)
  redis.call('PEXPIRE', key, ttl)
  redis.call('SADD', keys[2], key)
  return answer
end

-- KEYS[1]: the replicas' sorted set. ARGV[1]: the caller's clock in µs, or ''.
-- ARGV[2]: this replica's id. ARGV[3]: how long the heartbeat counts, µs.
-- Returns how many replicas have a heartbeat that still counts, this one included.
local function heartbeat(keys, args)
  local now = clock(args[1])
  redis.call('ZADD', keys[1], now + num(args[3], 0), args[2])
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', now)
  return redis.call('ZCARD', keys[1])
end

-- KEYS[1]: the leader key. ARGV[1]: this replica's id. ARGV[2]: how long the lead lasts, ms.
-- Takes the lead if nobody holds it, or keeps it if this replica does. Returns 1 if it leads.
local function lead(keys, args)
  local holder = redis.call('GET', keys[1])
  if holder == false or holder == args[1] then
    redis.call('SET', keys[1], args[1], 'PX', math.max(1, math.floor(num(args[2], 1))))
    return 1
  end
  return 0
end

-- KEYS[1]: a scope's hash. KEYS[2]: the set of every scope's hash.
-- ARGV[1]: the caller's clock in µs, or ''. ARGV[2]: the tick index these limits are for; a tick
-- not above the last one applied changes nothing (two leaders for a moment tick once).
-- Then per metric m = 0..3, from ARGV[3 + 4m]: the new interval (µs per unit, 0: not limited),
-- the adaptive state's limit and memory (Rust's `adapt::MetricState`), and the usage mark (the
-- hash's 'u' count the tick consumed). Each bucket is rescaled so its level in units stays.
-- Returns 1 if applied, 0 if not (stale tick, or the scope's hash expired: it is forgotten).
local function tick(keys, args)
  local key = keys[1]
  if redis.call('EXISTS', key) == 0 then
    redis.call('SREM', keys[2], key)
    return 0
  end
  local index = num(args[2], 0)
  if index <= num(redis.call('HGET', key, 'k'), -1) then
    return 0
  end
  local now = clock(args[1])
  local elapsed = math.max(0, now - num(redis.call('HGET', key, 't'), now))
  for m = 0, 3 do
    local at = 3 + 4 * m
    local new = math.max(0, num(args[at], 0))
    local fields = redis.call('HMGET', key, 'd' .. m, 'i' .. m)
    local old = num(fields[2], 0)
    local d = math.max(0, num(fields[1], 0) - elapsed)
    if old > 0 and new > 0 then
      d = d * new / old
    end
    redis.call('HSET', key, 'd' .. m, d, 'i' .. m, new, 'l' .. m, num(args[at + 1], 0),
      'm' .. m, num(args[at + 2], 0), 'w' .. m, num(args[at + 3], 0))
  end
  redis.call('HSET', key, 'k', index, 't', now)
  return 1
end

redis.register_function('sg_lease_v2', lease)
redis.register_function('sg_lead_v2', lead)
redis.register_function('sg_tick_v2', tick)
redis.register_function('sg_heartbeat_v2', heartbeat)
