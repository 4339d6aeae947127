//! The Lua scripts behind every Redis operation that touches more than one
//! key or must check before it writes. Redis runs a script atomically, so
//! each script is one of the store's atomic operations; scripts are sent
//! once and then called by their SHA-1 (`EVALSHA`, falling back to `EVAL`
//! after a Redis restart).
//!
//! Keys that depend on stored values (the state index a job leaves, the
//! owner's active set) are built inside the script from a prefix passed in
//! ARGV. That is fine on a single Redis (with replicas or Sentinel) but not
//! on Redis Cluster; see `docs/store.md`.
//!
//! Replies are arrays whose first element is a status word; the Rust side
//! turns them into outcomes and errors.

use redis::Script;

/// Creates a job with its idempotency key, or finds the key's job.
///
/// KEYS: 1 job hash, 2 all-jobs zset, 3 creation counter, 4 idempotency
/// hash, 5 owner's active set, 6 the new state's zset.
/// ARGV: 1 job id, 2 Job bytes, 3 owner, 4 idempotency field ('' if none),
/// 5 idempotency key, 6 spec sha256, 7 state, 8 active ('1'/'0'), 9 job
/// hash prefix.
/// Reply: {'existing', job_id, data, rev, owner} | {'reused', job_id} |
/// {'exists'} | {'created', seq}.
const CREATE_JOB: &str = r"
if ARGV[4] ~= '' then
  local owner_job = redis.call('HGET', KEYS[4], ARGV[4])
  if owner_job then
    local f = redis.call('HMGET', ARGV[9] .. owner_job, 'spec_sha256', 'data', 'rev', 'owner')
    if f[1] == ARGV[6] then
      return {'existing', owner_job, f[2], f[3], f[4]}
    end
    return {'reused', owner_job}
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists'}
end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'rev', 1, 'seq', seq, 'owner', ARGV[3],
  'state', ARGV[7], 'idem', ARGV[5], 'spec_sha256', ARGV[6], 'evseq', 0)
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[6], seq, ARGV[1])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[1])
end
if ARGV[8] == '1' then
  redis.call('SADD', KEYS[5], ARGV[1])
end
return {'created', seq}
";

/// The loop shared by UPDATE_JOB and APPEND_EVENTS: appends ARGV event
/// pairs (payload, step or '') starting at index `first`, each under the
/// next sequence of the job hash's `evseq` field, as stream entry
/// `<seq>-0`, and indexes metric events by step.
macro_rules! append_events_lua {
    () => {
        r"
local seq = tonumber(redis.call('HGET', KEYS[1], 'evseq') or '0')
for i = first, #ARGV, 2 do
  seq = redis.call('HINCRBY', KEYS[1], 'evseq', 1)
  redis.call('XADD', KEYS[2], seq .. '-0', 'e', ARGV[i])
  if ARGV[i + 1] ~= '' then
    redis.call('ZADD', KEYS[3], ARGV[i + 1], string.format('%020d', seq))
  end
end
"
    };
}

/// Compare-and-set of a job, plus its events, in one step.
///
/// KEYS: 1 job hash, 2 job's event stream, 3 job's metric-step zset.
/// ARGV: 1 job id, 2 expected revision, 3 Job bytes, 4 new state, 5 active
/// ('1'/'0'), 6 state-zset prefix, 7 owner-active-set prefix, 8.. event
/// pairs.
/// Reply: {'missing'} | {'conflict', rev} | {'terminal', state} |
/// {'ok', rev, owner}.
const UPDATE_JOB: &str = concat!(
    r"
local cur = redis.call('HMGET', KEYS[1], 'rev', 'state', 'owner', 'seq')
if not cur[1] then
  return {'missing'}
end
if cur[1] ~= ARGV[2] then
  return {'conflict', cur[1]}
end
-- SUCCEEDED, FAILED and CANCELLED (encore.v1.JobState 3, 4, 5) never change.
local terminal = {['3'] = true, ['4'] = true, ['5'] = true}
if cur[2] ~= ARGV[4] and terminal[cur[2]] then
  return {'terminal', cur[2]}
end
local rev = tonumber(cur[1]) + 1
redis.call('HSET', KEYS[1], 'data', ARGV[3], 'rev', rev, 'state', ARGV[4])
if cur[2] ~= ARGV[4] then
  redis.call('ZREM', ARGV[6] .. cur[2], ARGV[1])
  redis.call('ZADD', ARGV[6] .. ARGV[4], cur[4], ARGV[1])
end
if ARGV[5] == '1' then
  redis.call('SADD', ARGV[7] .. cur[3], ARGV[1])
else
  redis.call('SREM', ARGV[7] .. cur[3], ARGV[1])
end
local first = 8
",
    append_events_lua!(),
    r"
return {'ok', rev, cur[3]}
"
);

/// Appends events to an existing job.
///
/// KEYS: as UPDATE_JOB. ARGV: event pairs.
/// Reply: {'missing'} | {'ok', last sequence}.
const APPEND_EVENTS: &str = concat!(
    r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing'}
end
local first = 1
",
    append_events_lua!(),
    r"
return {'ok', seq}
"
);

/// Metric points after a step, by step.
///
/// KEYS: 1 metric-step zset, 2 event stream. ARGV: 1 after step, 2 limit
/// (-1: none).
/// Reply: array of JobEvent bytes.
const METRICS: &str = r"
local seqs = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
local out = {}
for _, padded in ipairs(seqs) do
  local id = (string.match(padded, '^0*(%d+)$') or padded) .. '-0'
  local entry = redis.call('XRANGE', KEYS[2], id, id)
  if entry[1] then
    out[#out + 1] = entry[1][2][2]
  end
end
return out
";

/// Registers a member unless its instance has a live one.
///
/// KEYS: 1 member hash, 2 deadline zset, 3 role set, 4 instance key.
/// ARGV: 1 member id, 2 Member bytes, 3 role, 4 instance id, 5 deadline ms,
/// 6 now ms, 7 member-hash prefix.
/// Reply: {'existing', data, status, rev, deadline} | {'exists'} |
/// {'registered'}.
const REGISTER_MEMBER: &str = r"
local holder = redis.call('GET', KEYS[4])
if holder then
  local f = redis.call('HMGET', ARGV[7] .. holder, 'data', 'status', 'rev', 'deadline')
  if f[4] and tonumber(f[4]) > tonumber(ARGV[6]) then
    return {'existing', f[1], f[2], f[3], f[4]}
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists'}
end
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'rev', 1, 'deadline', ARGV[5],
  'role', ARGV[3], 'instance', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], ARGV[1])
return {'registered'}
";

/// Compare-and-set of a member's record; lease and status stay.
///
/// KEYS: 1 member hash. ARGV: 1 expected revision, 2 Member bytes, 3 role,
/// 4 instance id.
/// Reply: {'missing'} | {'conflict', rev} | {'role'} | {'instance'} |
/// {'ok', rev, status, deadline}.
const UPDATE_MEMBER: &str = r"
local f = redis.call('HMGET', KEYS[1], 'rev', 'role', 'instance')
if not f[1] then
  return {'missing'}
end
if f[1] ~= ARGV[1] then
  return {'conflict', f[1]}
end
if f[2] ~= ARGV[3] then
  return {'role'}
end
if f[3] ~= ARGV[4] then
  return {'instance'}
end
local rev = tonumber(f[1]) + 1
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'rev', rev)
local g = redis.call('HMGET', KEYS[1], 'status', 'deadline')
return {'ok', rev, g[1], g[2]}
";

/// Extends a live lease, storing the heartbeat status if given.
///
/// KEYS: 1 member hash, 2 deadline zset. ARGV: 1 member id, 2 now ms, 3 new
/// deadline ms, 4 MemberStatus bytes, 5 has status ('1'/'0').
/// Reply: {'expired'} | {'ok', data, status, rev}.
const RENEW_LEASE: &str = r"
local d = redis.call('HGET', KEYS[1], 'deadline')
if not d or tonumber(d) <= tonumber(ARGV[2]) then
  return {'expired'}
end
redis.call('HSET', KEYS[1], 'deadline', ARGV[3])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'status', ARGV[4])
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local f = redis.call('HMGET', KEYS[1], 'data', 'status', 'rev')
return {'ok', f[1], f[2], f[3]}
";

/// Removes a member and its index entries.
///
/// KEYS: 1 member hash, 2 deadline zset. ARGV: 1 member id, 2 role-set
/// prefix, 3 instance-key prefix.
/// Reply: 1 removed | 0 unknown.
const REMOVE_MEMBER: &str = r"
local f = redis.call('HMGET', KEYS[1], 'role', 'instance')
if not f[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', ARGV[2] .. f[1], ARGV[1])
local instance_key = ARGV[3] .. f[2]
if redis.call('GET', instance_key) == ARGV[1] then
  redis.call('DEL', instance_key)
end
return 1
";

/// Decimal strings compared as numbers without Lua's double rounding.
macro_rules! decimal_le_lua {
    () => {
        r"
local function decimal_le(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a <= b
end
"
    };
}

/// Commits a weight version.
///
/// KEYS: 1 manifest hash, 2 version zset, 3 high-water key. ARGV: 1
/// version, 2 WeightManifest bytes.
/// Reply: {'exists', data} | {'not_monotonic', high} | {'committed'}.
const PUT_MANIFEST: &str = concat!(
    decimal_le_lua!(),
    r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  return {'exists', cur}
end
local high = redis.call('GET', KEYS[3])
if high and decimal_le(ARGV[1], high) then
  return {'not_monotonic', high}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[1])
redis.call('SET', KEYS[3], ARGV[1])
return {'committed'}
"
);

/// Deletes an unpinned weight version.
///
/// KEYS: 1 manifest hash, 2 version zset, 3 pin zset. ARGV: 1 version, 2
/// now ms.
/// Reply: 'missing' | 'pinned' | 'deleted'.
const DELETE_MANIFEST: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[2])
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 'missing'
end
local prefix = ARGV[1] .. ':'
for _, pin in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if string.sub(pin, 1, #prefix) == prefix then
    return 'pinned'
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 'deleted'
";

/// Pins a retained weight version.
///
/// KEYS: 1 manifest hash, 2 pin zset. ARGV: 1 version, 2 pin member
/// (`<version>:<holder>`), 3 deadline ms.
/// Reply: 1 pinned | 0 not retained.
const PIN: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 1
";

/// Appends to a rollout queue unless it is full. Never trims.
///
/// KEYS: 1 stream. ARGV: 1 max length, 2 payload.
/// Reply: {1, id} appended | {0, length} full.
const QUEUE_APPEND: &str = r"
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then
  return {0, n}
end
return {1, redis.call('XADD', KEYS[1], '*', 'p', ARGV[2])}
";

/// Acknowledges and deletes entries pending in a group.
///
/// KEYS: 1 stream. ARGV: 1 group, 2.. entry ids.
/// Reply: number acknowledged.
const QUEUE_ACK: &str = r"
local n = 0
for i = 2, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
";

/// Stores a preference record unless its (rater, key) was stored before.
///
/// KEYS: 1 keys hash, 2 records hash, 3 sequence counter. ARGV: 1 (rater,
/// key) field, 2 payload.
/// Reply: {1, seq} stored | {0, seq} duplicate.
const PUT_PREFERENCE: &str = r"
local seen = redis.call('HGET', KEYS[1], ARGV[1])
if seen then
  return {0, tonumber(seen)}
end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], seq)
redis.call('HSET', KEYS[2], seq, ARGV[2])
return {1, seq}
";

/// The scripts, hashed once.
pub(crate) struct Scripts {
    pub create_job: Script,
    pub update_job: Script,
    pub append_events: Script,
    pub metrics: Script,
    pub register_member: Script,
    pub update_member: Script,
    pub renew_lease: Script,
    pub remove_member: Script,
    pub put_manifest: Script,
    pub delete_manifest: Script,
    pub pin: Script,
    pub queue_append: Script,
    pub queue_ack: Script,
    pub put_preference: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            create_job: Script::new(CREATE_JOB),
            update_job: Script::new(UPDATE_JOB),
            append_events: Script::new(APPEND_EVENTS),
            metrics: Script::new(METRICS),
            register_member: Script::new(REGISTER_MEMBER),
            update_member: Script::new(UPDATE_MEMBER),
            renew_lease: Script::new(RENEW_LEASE),
            remove_member: Script::new(REMOVE_MEMBER),
            put_manifest: Script::new(PUT_MANIFEST),
            delete_manifest: Script::new(DELETE_MANIFEST),
            pin: Script::new(PIN),
            queue_append: Script::new(QUEUE_APPEND),
            queue_ack: Script::new(QUEUE_ACK),
            put_preference: Script::new(PUT_PREFERENCE),
        }
    }
}
