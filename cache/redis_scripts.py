"""The Lua scripts of the Redis store: each one round trip, each atomic within one slot."""

# An entry and its lock share a hash tag (one slot), so storing the entry and releasing the lock
# is one atomic script; a tag set lives in its tag's own slot and is only ever touched alone.
PUT_AND_UNLOCK = """
redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
if ARGV[3] ~= '' and redis.call('get', KEYS[2]) == ARGV[3] then redis.call('del', KEYS[2]) end
return 1
"""
# A tag set must outlive the longest entry in it, and never shorten another entry's life.
TAG = """
redis.call('sadd', KEYS[1], ARGV[1])
if redis.call('pttl', KEYS[1]) < tonumber(ARGV[2]) then redis.call('pexpire', KEYS[1], ARGV[2]) end
return 1
"""
# Taken again by the token that holds it: an acquire that timed out on our side may have
# taken the lock, and its owner's next poll must not wait for itself.
# The entry is read as GETRANGE 0 ARGV[3], as `get` reads it: an empty string is no entry.
ACQUIRE = """
local got = redis.call('set', KEYS[2], ARGV[1], 'nx', 'px', ARGV[2])
if not got and redis.call('get', KEYS[2]) == ARGV[1] then
  got = redis.call('set', KEYS[2], ARGV[1], 'xx', 'px', ARGV[2])
end
local data = redis.call('getrange', KEYS[1], 0, ARGV[3])
if data == '' then data = false end
return {got and 1 or 0, data}
"""
# A fetch's one round trip before its fan-out: the entry, and the lock only when the entry may
# not be served as it is. The test is `cache.entry.servable`'s, on the entry's header (magic,
# version, flags, status, written_at and, from version 2 on, its max-age cap, 4294967295 for
# none): ARGV[3] is "now,complete,partial,not_found,stale", the caller's clock, the ages each
# kind of entry may be served at and the stale seconds within the first two (one argument:
# each one costs the caller more to send than the server to split). Keep the two in step.
# LAST_BYTE is the store's: the script is made per store.
LOOKUP = """
local data = redis.call('getrange', KEYS[1], 0, LAST_BYTE)
if data ~= '' then
  local ok, magic, version, flags, status, written = pcall(struct.unpack, '>c2BBHd', data)
  if ok and magic == 'GW' and (version == 1 or version == 2) then
    local cap = 4294967295
    if version == 2 then
      local got_cap, value = pcall(struct.unpack, '>I4', data, 15)
      if got_cap then cap = value else ok = false end
    end
    local f = '^([^,]+),([^,]+),([^,]+),([^,]+),([^,]+)$'
    local now, complete, partial, missing, stale = string.match(ARGV[3], f)
    local window = 0
    if status == 200 then
      if flags % 2 == 1 then window = tonumber(complete) else window = tonumber(partial) end
      if cap ~= 4294967295 then
        if cap > 0 then window = math.min(window, cap + tonumber(stale)) else window = 0 end
      end
    elseif status == 404 then
      window = math.min(tonumber(missing), cap)
    end
    local age = tonumber(now) - written
    if age < 0 then age = 0 end
    if ok and age < window then return {0, data} end
  end
else
  data = false
end
local got = redis.call('set', KEYS[2], ARGV[1], 'nx', 'px', ARGV[2])
if not got and redis.call('get', KEYS[2]) == ARGV[1] then
  got = redis.call('set', KEYS[2], ARGV[1], 'xx', 'px', ARGV[2])
end
return {got and 1 or 0, data}
"""
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
