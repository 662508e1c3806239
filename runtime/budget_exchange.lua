-- One budget exchange, atomically: the Redis twin of policies.leases.LeaseBook.exchange.
-- ARGV[1] is a JSON request (see actors/budget_ledger.py _request_json). Keys live under req.prefix:
--   b:<bucket>  hash  capacity rate level last outstanding blocked_until granted spent returned written_off clamped
--               debited (granted = spent + returned + written_off + outstanding; debits are use beyond grants)
--   born        set once: a namespace missing it after the actor saw state means Redis came back empty
--   l:<lease>   hash  executor expires h:<bucket>=held
--   leases      zset  lease id by expiry
--   r:<report>  the reply already given to this report id (a retried exchange gets it again)
--   s:<day>:<tenant> hash of recorded spend; tenants:<day> set; buckets set
-- Invariant kept for every bucket: level + outstanding <= capacity.
local req = cjson.decode(ARGV[1])
local P = req.prefix
local now = tonumber(req.now)

local function fmt(x) return string.format('%.17g', x) end
local function num(x) if type(x) == 'number' then return x end return 0 end

if req.report_id ~= '' then
  local seen = redis.call('GET', P .. 'r:' .. req.report_id)
  if seen then return seen end
end

-- A Redis that lost this namespace's state while the actor was using it (restarted empty) must not
-- open its buckets full: the provider's window still holds recent use.
local fresh = redis.call('SETNX', P .. 'born', fmt(now)) == 1
local start_full = req.start_full and not (fresh and req.expect_state)

local buckets = {}

local function refill(b)
  local dt = math.max(0, now - b.last)
  local room = b.capacity - b.outstanding
  if b.level < room then b.level = math.min(room, b.level + dt * b.rate) end
  b.last = math.max(b.last, now)
end

local function load(key, cap, rate)
  local b = buckets[key]
  if b == nil then
    local h = redis.call('HGETALL', P .. 'b:' .. key)
    if #h > 0 then
      b = {}
      for i = 1, #h, 2 do b[h[i]] = tonumber(h[i + 1]) end
    elseif cap == nil then
      return nil
    else
      local level = 0
      if start_full then level = cap end
      b = {capacity = cap, rate = rate, level = level, last = now, outstanding = 0, blocked_until = 0,
           granted = 0, spent = 0, returned = 0, written_off = 0, clamped = 0, debited = 0}
      redis.call('SADD', P .. 'buckets', key)
    end
    buckets[key] = b
  end
  if cap ~= nil and (b.capacity ~= cap or b.rate ~= rate) then
    refill(b)
    b.capacity = cap
    b.rate = rate
    b.level = math.min(b.level, cap - b.outstanding)
  end
  return b
end

local function write_off(b, amount)
  refill(b)
  amount = math.min(math.max(0, amount), b.outstanding)
  b.outstanding = b.outstanding - amount
  b.written_off = b.written_off + amount
end

-- 1. Leases past their expiry: their holders are gone; what they held is written off as spent.
local dead = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now)
for _, id in ipairs(dead) do
  local h = redis.call('HGETALL', P .. 'l:' .. id)
  for i = 1, #h, 2 do
    if string.sub(h[i], 1, 2) == 'h:' then
      local b = load(string.sub(h[i], 3), nil, nil)
      if b ~= nil then write_off(b, tonumber(h[i + 1])) end
    end
  end
  redis.call('DEL', P .. 'l:' .. id)
  redis.call('ZREM', P .. 'leases', id)
end

-- 2. The caller's lease, if it is still alive.
local lease_id = req.new_lease_id
local lost = false
local held = {}
if req.lease_id ~= '' then
  if redis.call('EXISTS', P .. 'l:' .. req.lease_id) == 1 then
    lease_id = req.lease_id
    local h = redis.call('HGETALL', P .. 'l:' .. lease_id)
    for i = 1, #h, 2 do
      if string.sub(h[i], 1, 2) == 'h:' then held[string.sub(h[i], 3)] = tonumber(h[i + 1]) end
    end
  else
    lost = true
  end
end

-- 3. Provider feedback: the free level never above the provider's remaining; a 429 blocks until its Retry-After.
for key, fb in pairs(req.feedback) do
  local b = load(key, fb.capacity, fb.rate)
  refill(b)
  if type(fb.remaining) == 'number' then
    local ceiling = fb.remaining
    if b.level > ceiling then
      local removed = b.level - math.max(ceiling, -b.capacity)
      b.level = b.level - removed
      b.clamped = b.clamped + removed
    end
  end
  if type(fb.blocked_s) == 'number' then
    b.blocked_until = math.max(b.blocked_until, now + math.max(0, fb.blocked_s))
    if b.level > 0 then
      b.clamped = b.clamped + b.level
      b.level = 0
    end
  end
end

-- 4. Spent, returned, refunded, debited.
for key, op in pairs(req.ops) do
  local b = load(key, op.capacity, op.rate)
  if not lost then
    local h = held[key] or 0
    local spent = math.min(num(op.spent), h)
    refill(b)   -- before the held tokens leave: until now they filled the room
    local s = math.min(math.max(0, spent), b.outstanding)
    b.outstanding = b.outstanding - s
    b.spent = b.spent + s
    h = h - spent
    refill(b)
    local back = math.min(math.max(0, math.min(num(op.ret), h)), b.outstanding)
    b.outstanding = b.outstanding - back
    b.level = b.level + back
    b.returned = b.returned + back
    held[key] = h - back
  end
  refill(b)
  b.level = math.min(b.capacity - b.outstanding, b.level + math.max(0, num(op.refund)))
  b.level = b.level - math.max(0, num(op.debit))
  b.debited = (b.debited or 0) + math.max(0, num(op.debit))
end

-- 5. Grants (all or nothing when exact).
local function available(b)
  refill(b)
  if now < b.blocked_until then return 0 end
  return math.max(0, b.level)
end

local granted = {}
local any_granted = false
if not req.close then
  local ok = true
  if req.exact then
    for key, op in pairs(req.ops) do
      if num(op.want) > 0 and available(buckets[key]) + 1e-9 < num(op.want) then ok = false end
    end
  end
  if ok then
    for key, op in pairs(req.ops) do
      if num(op.want) > 0 then
        local b = buckets[key]
        local g = math.min(num(op.want), available(b))
        if g > 0 then
          b.level = b.level - g
          b.outstanding = b.outstanding + g
          b.granted = b.granted + g
          held[key] = (held[key] or 0) + g
          granted[key] = g
          any_granted = true
        end
      end
    end
  end
end

-- 6. The lease: closed (anything still held is written off) or renewed for ttl.
local lkey = P .. 'l:' .. lease_id
if req.close then
  for key, h in pairs(held) do
    local b = load(key, nil, nil)
    if b ~= nil then write_off(b, h) end
  end
  redis.call('DEL', lkey)
  redis.call('ZREM', P .. 'leases', lease_id)
else
  local expires = now + req.ttl
  redis.call('HSET', lkey, 'executor', req.executor, 'expires', fmt(expires))
  for key, h in pairs(held) do redis.call('HSET', lkey, 'h:' .. key, fmt(h)) end
  redis.call('ZADD', P .. 'leases', expires, lease_id)
end

-- 7. Recorded spend, per tenant and UTC day.
for tenant, d in pairs(req.spend) do
  local sk = P .. 's:' .. req.day .. ':' .. tenant
  redis.call('HINCRBYFLOAT', sk, 'usd', fmt(num(d.usd)))
  for _, f in ipairs({'input_tokens', 'output_tokens', 'attempts', 'cancelled', 'wasted_tokens'}) do
    redis.call('HINCRBY', sk, f, math.floor(num(d[f]) + 0.5))
  end
  redis.call('SADD', P .. 'tenants:' .. req.day, tenant)
end

-- 8. Save the buckets and answer.
local views = {}
for key, b in pairs(buckets) do
  redis.call('HSET', P .. 'b:' .. key, 'capacity', fmt(b.capacity), 'rate', fmt(b.rate), 'level', fmt(b.level),
    'last', fmt(b.last), 'outstanding', fmt(b.outstanding), 'blocked_until', fmt(b.blocked_until),
    'granted', fmt(b.granted), 'spent', fmt(b.spent), 'returned', fmt(b.returned),
    'written_off', fmt(b.written_off), 'clamped', fmt(b.clamped), 'debited', fmt(b.debited or 0))
  if req.ops[key] ~= nil then
    refill(b)
    views[key] = {capacity = b.capacity, rate = b.rate, level = b.level, outstanding = b.outstanding,
                  blocked_s = math.max(0, b.blocked_until - now)}
  end
end
local reply = cjson.encode({lease_id = lease_id, lost = lost, granted = granted, buckets = views, ttl = req.ttl})
if req.report_id ~= '' then
  redis.call('SET', P .. 'r:' .. req.report_id, reply, 'EX', req.reply_ttl)
end
return reply
