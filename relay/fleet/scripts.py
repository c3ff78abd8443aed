"""The Lua scripts the fleet runs in Redis: each is one atomic step, on Redis's clock.

TAKE counts one message (or one connection) against one or more limits at once, all
or none. Each limit is a sorted set of entries "node|id|weight" scored by when they
expire: a message counts for rate_limit's interval (a sliding window, so no window
ever holds more than the limit), for a day towards max_recipients_per_day (weight:
its recipients; no fair sharing there: a day is too long to keep room for a
relay that waits), and a connection's lease until it is released or, when its relay
died, expires (the live relays renew theirs with every heartbeat). Fair sharing: a
relay that was refused is noted as waiting (until a little after the time it was told
to come back); while others wait, room is kept for each of them against a relay that
was not waiting itself, and a relay already using its share (limit / the relays
waiting and itself) is refused too, so a busy relay cannot starve the others.

HEARTBEAT writes this relay's record with a time to live, and returns every live one.
"""

TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local node, id, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local mine_prefix = node .. '|'
local ready, contended = 0, 0
local function weight_of(member)
  return tonumber(string.match(member, '|(%d+)$'))
end
for i = 1, n do
  local entries, waiters = KEYS[2 * i - 1], KEYS[2 * i]
  local base = 3 + (i - 1) * 5
  local limit, weight = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 3])
  local step, kind = tonumber(ARGV[base + 4]), ARGV[base + 5]
  local fair = kind ~= 'quota'
  redis.call('ZREMRANGEBYSCORE', entries, '-inf', now)
  local live = redis.call('ZRANGE', entries, 0, -1, 'WITHSCORES')
  local used, mine = 0, 0
  for j = 1, #live, 2 do
    local w = weight_of(live[j])
    used = used + w
    if string.sub(live[j], 1, #mine_prefix) == mine_prefix then mine = mine + w end
  end
  local others, waited = 0, false
  local waiting = {}
  if fair then waiting = redis.call('HGETALL', waiters) end
  for j = 1, #waiting, 2 do
    if tonumber(waiting[j + 1]) <= now then
      redis.call('HDEL', waiters, waiting[j])
    elseif waiting[j] ~= node then
      others = others + 1
    else
      waited = true
    end
  end
  contended = math.max(contended, others)
  if (used > 0 and used + weight > limit)
      or (others > 0 and not waited and used + weight + others > limit) then
    local at = now + step
    if kind ~= 'lease' then
      local freed = used
      for j = 1, #live, 2 do
        if freed + weight <= limit then break end
        freed = freed - weight_of(live[j])
        at = tonumber(live[j + 1])
      end
    end
    ready = math.max(ready, at)
  elseif fair and others > 0 and mine > 0 and mine + weight > math.ceil(limit / (others + 1)) then
    ready = math.max(ready, now + step)
  end
end
if ready > 0 then
  for i = 1, n do
    local base = 3 + (i - 1) * 5
    if ARGV[base + 5] ~= 'quota' then
      local grace = 2 + tonumber(ARGV[base + 4])
      redis.call('HSET', KEYS[2 * i], node, ready + grace)
      redis.call('PEXPIRE', KEYS[2 * i], math.ceil((ready - now + grace) * 1000) + 60000)
    end
  end
  return {0, tostring(now), tostring(ready), contended}
end
local taken = {}
for i = 1, n do
  local base = 3 + (i - 1) * 5
  local ttl, weight = tonumber(ARGV[base + 2]), ARGV[base + 3]
  local member = node .. '|' .. id .. '|' .. weight
  redis.call('ZADD', KEYS[2 * i - 1], now + ttl, member)
  redis.call('PEXPIRE', KEYS[2 * i - 1], math.ceil(ttl * 1000) + 60000)
  redis.call('HDEL', KEYS[2 * i], node)
  taken[i] = member
end
return {1, tostring(now), '0', contended, unpack(taken)}
"""

RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
local node = ARGV[2]
local others = 0
local waiting = redis.call('HGETALL', KEYS[2])
for j = 1, #waiting, 2 do
  if tonumber(waiting[j + 1]) > now and waiting[j] ~= node then others = others + 1 end
end
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
if #ARGV > 2 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000) + 60000)
end
return others
"""
"""Renew this relay's connection leases (KEYS[1]); return how many other relays wait
for a connection (KEYS[2])."""

HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[2] .. ARGV[1], ARGV[3], 'PX', math.ceil(ttl * 1000))
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000) + 60000)
local names = redis.call('ZRANGE', KEYS[1], 0, -1)
local found = {}
for i, name in ipairs(names) do
  local record = redis.call('GET', KEYS[2] .. name)
  if record then
    found[#found + 1] = record
  end
end
return found
"""
"""KEYS[1]: the sorted set of node names by expiry; KEYS[2]: the prefix of the records.
ARGV: this node's name, its time to live in seconds, its record (JSON)."""
