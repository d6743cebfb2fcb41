"""The Lua scripts of the Redis store, one named constant each.

Each script's header comment names its KEYS and ARGV. Every script touches
only keys of one user, which share the hash tag ``{<ns>:lk:<uid>}``, or one
state hash, so each runs in one Redis Cluster slot.
"""

from __future__ import annotations

# Lua helpers, prepended to the scripts that use them. They act on KEYS[1],
# the link key, and KEYS[2], the UID hash key.
#
# write_link(pod, ttl_ms, service): ttl_ms '-1' writes a persistent link and
# records it in the UID hash. Otherwise the link expires after ttl_ms and
# leaves the UID hash.
_WRITE_LINK_LUA = """
local function write_link(pod, ttl_ms, service)
  if ttl_ms == '-1' then
    redis.call('SET', KEYS[1], pod)
    redis.call('HSET', KEYS[2], service, pod)
  else
    redis.call('SET', KEYS[1], pod, 'PX', ttl_ms)
    redis.call('HDEL', KEYS[2], service)
  end
end
"""

# delete_link(delay_ms, service): delay_ms '0' deletes the link now,
# otherwise the link expires after delay_ms. Either way it leaves the UID
# hash at once, and Redis deletes the hash when its last field goes.
# Returns 1 when the link existed.
_DELETE_LINK_LUA = """
local function delete_link(delay_ms, service)
  local existed
  if delay_ms == '0' then
    existed = redis.call('DEL', KEYS[1])
  else
    existed = redis.call('PEXPIRE', KEYS[1], delay_ms)
  end
  redis.call('HDEL', KEYS[2], service)
  return existed
end
"""

# names_pod(value, pod): whether the stored value is the decimal pod index
# `pod`. Lua's tonumber() alone would also accept ' 1', '1e0' and '0x1'.
_NAMES_POD_LUA = """
local function names_pod(value, pod)
  return string.match(value, '^%d+$') ~= nil and tonumber(value) == tonumber(pod)
end
"""

# KEYS[1] link key. ARGV[1] TTL in ms.
# Returns the pod, or nil. Restarts the TTL only when the link has one.
GET_AND_REFRESH_LUA = """
local pod = redis.call('GET', KEYS[1])
if pod and redis.call('PTTL', KEYS[1]) >= 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return pod
"""

# KEYS[1] link key. ARGV[1] TTL in ms.
# Returns {pod, 1} for a persistent link, {pod, 0} for a temporary one after
# restarting its TTL, or nil.
READ_LINK_LUA = """
local pod = redis.call('GET', KEYS[1])
if not pod then
  return false
end
if redis.call('PTTL', KEYS[1]) >= 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return {pod, 0}
end
return {pod, 1}
"""

# KEYS[1] link key, KEYS[2] move notice key. ARGV[1] TTL in ms.
# Returns {pod, 1 if persistent else 0, notice or false} after restarting
# the TTL of a temporary link and deleting the notice, or nil.
READ_LINK_NOTICED_LUA = """
local pod = redis.call('GET', KEYS[1])
if not pod then
  return false
end
local notice = redis.call('GET', KEYS[2])
if notice then
  redis.call('DEL', KEYS[2])
end
if redis.call('PTTL', KEYS[1]) >= 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return {pod, 0, notice}
end
return {pod, 1, notice}
"""

# KEYS[1] link key, KEYS[2] UID hash key.
# ARGV[1] pod, ARGV[2] TTL in ms or '-1' for persistent, ARGV[3] service.
# Returns the previous pod, or nil.
SET_LUA = (
    _WRITE_LINK_LUA
    + """
local previous = redis.call('GET', KEYS[1])
write_link(ARGV[1], ARGV[2], ARGV[3])
return previous
"""
)

# KEYS[1] link key, KEYS[2] UID hash key.
# ARGV[1] pod, ARGV[2] TTL in ms or '-1' for persistent, ARGV[3] service.
# Returns {1, pod} when it wrote the link, or {0, current value} when a
# persistent link names another pod or contains a value that is no pod.
TRY_SET_LUA = (
    _WRITE_LINK_LUA
    + _NAMES_POD_LUA
    + """
local current = redis.call('GET', KEYS[1])
if current and not names_pod(current, ARGV[1])
    and redis.call('PTTL', KEYS[1]) == -1 then
  return {0, current}
end
write_link(ARGV[1], ARGV[2], ARGV[3])
return {1, ARGV[1]}
"""
)

# KEYS[1] link key, KEYS[2] UID hash key.
# ARGV[1] pod, ARGV[2] TTL in ms or '-1' for persistent, ARGV[3] service.
# Returns the value linked now: the existing one, or ARGV[1].
SET_IF_ABSENT_LUA = (
    _WRITE_LINK_LUA
    + """
local current = redis.call('GET', KEYS[1])
if current then
  return current
end
write_link(ARGV[1], ARGV[2], ARGV[3])
return ARGV[1]
"""
)

# KEYS[1] link key, KEYS[2] UID hash key.
# ARGV[1] delay in ms or '0' for now, ARGV[2] service.
# Returns 1 when the link existed, else 0.
REMOVE_LUA = (
    _DELETE_LINK_LUA
    + """
return delete_link(ARGV[1], ARGV[2])
"""
)

# KEYS[1] link key, KEYS[2] UID hash key.
# ARGV[1] pod, ARGV[2] delay in ms or '0' for now, ARGV[3] service.
# Returns 1 when it removed the link, 0 when there is no link or it names
# another pod, or the stored value when that value is no pod index.
REMOVE_IF_POD_LUA = (
    _DELETE_LINK_LUA
    + _NAMES_POD_LUA
    + """
local current = redis.call('GET', KEYS[1])
if not current then
  return 0
end
if not string.match(current, '^%d+$') then
  return current
end
if not names_pod(current, ARGV[1]) then
  return 0
end
delete_link(ARGV[2], ARGV[3])
return 1
"""
)

# KEYS[1] link key, KEYS[2] UID hash key, KEYS[3] move notice key.
# ARGV[1] old pod, ARGV[2] new pod, ARGV[3] TTL in ms or '-1', ARGV[4] service,
# ARGV[5] notice reason or '' for none, ARGV[6] notice lifetime in ms.
# Returns {1, new pod} when the link named the old pod and now names the new
# one, {0, current value} when it names something else, or {0} when there
# is no link.
REPLACE_IF_POD_LUA = (
    _WRITE_LINK_LUA
    + _NAMES_POD_LUA
    + """
local current = redis.call('GET', KEYS[1])
if not current then
  return {0}
end
if not names_pod(current, ARGV[1]) then
  return {0, current}
end
write_link(ARGV[2], ARGV[3], ARGV[4])
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[3], ARGV[1] .. ':' .. ARGV[5], 'PX', ARGV[6])
end
return {1, ARGV[2]}
"""
)

# KEYS[1] state hash key.
# ARGV[1] pod, ARGV[2] new record, ARGV[3] '1' to expect no record, else '0',
# ARGV[4] the expected record when ARGV[3] is '0'.
# Returns 1 when it wrote the record, 0 when the stored one differs.
REPLACE_POD_STATE_LUA = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[3] == '1' then
  if current then
    return 0
  end
elseif current ~= ARGV[4] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS[1] link key. ARGV[1] pod.
# Returns 1 when the link named the pod, had a TTL, and was deleted; else 0.
# A temporary link is never in the UID hash, so the hash is left alone.
REMOVE_IF_TEMPORARY_LUA = (
    _NAMES_POD_LUA
    + """
local current = redis.call('GET', KEYS[1])
if not current or not names_pod(current, ARGV[1]) then
  return 0
end
if redis.call('PTTL', KEYS[1]) < 0 then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"""
)

# KEYS[1] link key. No ARGV.
# Returns the pod when the link exists and has no TTL, else nil.
GET_IF_PERSISTENT_LUA = """
local pod = redis.call('GET', KEYS[1])
if pod and redis.call('PTTL', KEYS[1]) == -1 then
  return pod
end
return false
"""
