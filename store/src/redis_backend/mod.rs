//! The Redis backend: the cluster's state in a Redis server that the
//! coordinator, actors and learners all reach. Values are the same prost
//! bytes the embedded backend keeps; every check-then-write is one Lua script
//! ([`scripts`]), so two coordinators (or a coordinator restarted while its
//! old process still runs) cannot interleave inside an operation.
//!
//! Rollout queues are Redis Streams read through a consumer group per job
//! (`XREADGROUP`, `XACK` + `XDEL`, `XAUTOCLAIM`). Blocking reads
//! (`XREADGROUP BLOCK`, `XREAD BLOCK` for job events) hold a connection for
//! their whole wait, so they run on connections of their own from a small
//! pool, never on the shared multiplexed [`ConnectionManager`], where they
//! would stall every other call.
//!
//! Lease and pin deadlines come from the store's [`Clock`] and are passed
//! into the scripts, so they are tested with a manual clock like the
//! embedded backend; only queue idle times are Redis' own. The key layout is
//! in `docs/store.md`. Durability is the deployment's business (AOF with
//! `appendfsync everysec` or `always`).

mod scripts;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use encore_proto::v1::{
    Job, JobEvent, JobState, MemberStatus, MetricPoint, Role, WeightManifest, job_event,
};
use prost::Message;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, Client, Cmd, RedisError, Value};

use self::scripts::Scripts;
use crate::Store;
use crate::clock::{Clock, deadline_millis, from_millis, millis};
use crate::error::{Result, StoreError};
use crate::types::{
    AppendOutcome, CreateOutcome, EntryId, IdempotencyKey, JobPage, ManifestPut, Member,
    MemberRecord, QueueEntry, RecordPut, Registration, StoredJob, decode_page_token,
    effective_page_size, encode_page_token, state_matches,
};
use crate::validate::{
    STORABLE_STATES, check_same_manifest, check_transition, is_active, manifest_identity,
    require_non_empty, validate_events, validate_job, validate_member, validate_queue_args,
    version_id,
};

/// How to reach Redis and where in it the store lives.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://...`.
    pub url: String,
    /// Prefix of every key the store writes (default `encore:`), so that
    /// several Encore clusters (or tests) can share one Redis.
    pub prefix: String,
    /// How long a non-blocking command may take before it fails.
    pub response_timeout: Duration,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// Idle connections kept for blocking reads.
    pub blocking_pool: usize,
}

impl RedisConfig {
    /// The defaults for `url`: prefix `encore:`, 5 s timeouts, 8 pooled
    /// blocking connections.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "encore:".into(),
            response_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            blocking_pool: 8,
        }
    }

    /// The same with another key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

/// The store in Redis. See the module docs.
pub struct RedisStore {
    config: RedisConfig,
    client: Client,
    conn: ConnectionManager,
    keys: Keys,
    scripts: Scripts,
    clock: Arc<dyn Clock>,
    /// Idle connections for blocking reads.
    blocking: Mutex<Vec<MultiplexedConnection>>,
    /// (stream key, group) pairs known to exist.
    groups: Mutex<HashSet<(String, String)>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

/// The key layout (documented in `docs/store.md`). Each kind of key has a
/// namespace of its own, so no id, whatever characters it holds, can make
/// two kinds collide.
struct Keys {
    prefix: String,
}

impl Keys {
    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }
    fn namespace(&self, kind: &str) -> String {
        format!("{}{kind}:", self.prefix)
    }
    fn global(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn job(&self, job_id: &str) -> String {
        self.key("job", job_id)
    }
    fn jobs(&self) -> String {
        self.global("jobs")
    }
    fn jobs_by_state(&self, state: i32) -> String {
        self.key("jobs_by_state", &state.to_string())
    }
    fn job_seq(&self) -> String {
        self.global("job_seq")
    }
    fn idempotency(&self) -> String {
        self.global("idempotency")
    }
    fn owner_active(&self, owner: &str) -> String {
        self.key("owner_active", owner)
    }
    fn events(&self, job_id: &str) -> String {
        self.key("events", job_id)
    }
    fn metric_steps(&self, job_id: &str) -> String {
        self.key("metric_steps", job_id)
    }
    fn member(&self, member_id: &str) -> String {
        self.key("member", member_id)
    }
    fn member_deadlines(&self) -> String {
        self.global("member_deadlines")
    }
    fn members_by_role(&self, role: i32) -> String {
        self.key("members_by_role", &role.to_string())
    }
    fn instance(&self, instance_id: &str) -> String {
        self.key("instance", instance_id)
    }
    fn manifests(&self, job_id: &str) -> String {
        self.key("manifests", job_id)
    }
    fn manifest_versions(&self, job_id: &str) -> String {
        self.key("manifest_versions", job_id)
    }
    fn manifest_high(&self, job_id: &str) -> String {
        self.key("manifest_high", job_id)
    }
    fn pins(&self, job_id: &str) -> String {
        self.key("pins", job_id)
    }
    fn queue(&self, job_id: &str) -> String {
        self.key("queue", job_id)
    }
    fn preference_keys(&self) -> String {
        self.global("preference_keys")
    }
    fn preferences(&self) -> String {
        self.global("preferences")
    }
    fn preference_seq(&self) -> String {
        self.global("preference_seq")
    }
    fn clip(&self, clip_id: &str) -> String {
        self.key("clip", clip_id)
    }
}

/// The idempotency hash's field for an owner's key; the length prefix keeps
/// ("a:b", "c") and ("a", "b:c") apart.
fn idempotency_field(owner: &str, key: &str) -> String {
    format!("{}:{owner}:{key}", owner.len())
}

// ----- Reply parsing -----

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

fn text_of(value: &Value) -> Option<&str> {
    bytes_of(value).and_then(|b| std::str::from_utf8(b).ok())
}

fn u64_of(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text_of(other)?.parse().ok(),
    }
}

/// A script's reply array and its status word.
fn status_reply(value: Value, what: &str) -> Result<(String, Vec<Value>)> {
    let Value::Array(items) = value else {
        return Err(StoreError::decode(
            what,
            format!("expected an array, got {value:?}"),
        ));
    };
    let status = items
        .first()
        .and_then(text_of)
        .ok_or_else(|| StoreError::decode(what, "reply has no status word"))?
        .to_owned();
    Ok((status, items))
}

/// Element `i` of a reply as an integer.
fn u64_at(items: &[Value], i: usize, what: &str) -> Result<u64> {
    items
        .get(i)
        .and_then(u64_of)
        .ok_or_else(|| StoreError::decode(what, format!("reply element {i} is not an integer")))
}

/// Element `i` of a reply as bytes.
fn bytes_at<'a>(items: &'a [Value], i: usize, what: &str) -> Result<&'a [u8]> {
    items
        .get(i)
        .and_then(bytes_of)
        .ok_or_else(|| StoreError::decode(what, format!("reply element {i} is not a string")))
}

fn decode<M: Message + Default>(bytes: &[u8], what: impl FnOnce() -> String) -> Result<M> {
    M::decode(bytes).map_err(|e| StoreError::decode(what(), e))
}

fn unexpected(what: &str, status: &str) -> StoreError {
    StoreError::decode(what, format!("unexpected status {status:?}"))
}

fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

fn is_code(err: &RedisError, code: &str) -> bool {
    err.code() == Some(code)
}

/// ARGV pairs (JobEvent bytes without sequence, step or '') for the event
/// scripts.
fn event_args(events: &[JobEvent]) -> Vec<Vec<u8>> {
    let mut args = Vec::with_capacity(events.len() * 2);
    for event in events {
        let mut event = event.clone();
        event.sequence = 0;
        let step = match &event.event {
            Some(job_event::Event::Metrics(point)) => point.step.to_string(),
            _ => String::new(),
        };
        args.push(event.encode_to_vec());
        args.push(step.into_bytes());
    }
    args
}

/// A job event from its stream entry (`<sequence>-0`, field `e`).
fn event_from_entry(entry: &StreamId, key: &str) -> Result<JobEvent> {
    let what = || format!("{key} entry {}", entry.id);
    let id: EntryId = entry
        .id
        .parse()
        .map_err(|_| StoreError::decode(what(), "entry id is not <seq>-0"))?;
    let bytes = entry
        .map
        .get("e")
        .and_then(bytes_of)
        .ok_or_else(|| StoreError::decode(what(), "no field e"))?;
    let mut event: JobEvent = decode(bytes, what)?;
    event.sequence = id.ms;
    Ok(event)
}

/// A queue entry from its stream entry (field `p`).
fn queue_entry(entry: &StreamId, key: &str) -> Result<QueueEntry> {
    let what = || format!("{key} entry {}", entry.id);
    let id: EntryId = entry
        .id
        .parse()
        .map_err(|_| StoreError::decode(what(), "malformed entry id"))?;
    let payload = entry
        .map
        .get("p")
        .and_then(bytes_of)
        .ok_or_else(|| StoreError::decode(what(), "no field p"))?
        .to_vec();
    Ok(QueueEntry { id, payload })
}

/// A member record from its hash fields (data, status, rev, deadline).
fn member_record(fields: &[Value], key: &str) -> Result<Option<MemberRecord>> {
    let Some(data) = fields.first().and_then(bytes_of) else {
        return Ok(None);
    };
    let member: Member = decode(data, || format!("{key} field data"))?;
    let status = match fields.get(1).and_then(bytes_of) {
        Some(bytes) => Some(decode(bytes, || format!("{key} field status"))?),
        None => None,
    };
    let revision = u64_at(fields, 2, &format!("{key} field rev"))?;
    let deadline = u64_at(fields, 3, &format!("{key} field deadline"))?;
    Ok(Some(MemberRecord {
        member,
        status,
        revision,
        lease_deadline: from_millis(deadline),
    }))
}

/// A stored job from its hash fields (data, rev, owner).
fn stored_job(fields: &[Value], key: &str) -> Result<Option<StoredJob>> {
    let Some(data) = fields.first().and_then(bytes_of) else {
        return Ok(None);
    };
    let job: Job = decode(data, || format!("{key} field data"))?;
    let revision = u64_at(fields, 1, &format!("{key} field rev"))?;
    let owner = fields
        .get(2)
        .and_then(text_of)
        .ok_or_else(|| StoreError::decode(format!("{key} field owner"), "missing"))?
        .to_owned();
    Ok(Some(StoredJob {
        job,
        revision,
        owner,
    }))
}

fn array(value: Value, what: &str) -> Result<Vec<Value>> {
    match value {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(StoreError::decode(
            what,
            format!("expected an array, got {other:?}"),
        )),
    }
}

impl RedisStore {
    /// Connects (failing if Redis does not answer PING) and prepares the
    /// scripts.
    pub async fn connect(config: RedisConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        let client = Client::open(config.url.as_str())?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.connect_timeout));
        let mut conn = ConnectionManager::new_with_config(client.clone(), manager_config).await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(Self {
            keys: Keys {
                prefix: config.prefix.clone(),
            },
            config,
            client,
            conn,
            scripts: Scripts::new(),
            clock,
            blocking: Mutex::new(Vec::new()),
            groups: Mutex::new(HashSet::new()),
        })
    }

    /// The stream key of a job's rollout queue (what `RolloutQueue.stream`
    /// names).
    pub fn queue_key(&self, job_id: &str) -> String {
        self.keys.queue(job_id)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        Ok(cmd.query_async(&mut self.conn()).await?)
    }

    /// Runs a blocking command on a pooled connection of its own, giving up
    /// `block` plus the response timeout after it was sent.
    async fn query_blocking<T: redis::FromRedisValue>(
        &self,
        cmd: &Cmd,
        block: Duration,
    ) -> redis::RedisResult<T> {
        let pooled = self
            .blocking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.config.connect_timeout))
                    .set_response_timeout(None);
                self.client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?
            }
        };
        let limit = block + self.config.response_timeout;
        let reply = tokio::time::timeout(limit, cmd.query_async::<T>(&mut conn))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no reply to a blocking read within {limit:?}"),
                )
            })??;
        // Only a connection that answered goes back to the pool.
        let mut pool = self.blocking.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < self.config.blocking_pool {
            pool.push(conn);
        }
        Ok(reply)
    }

    async fn job_exists(&self, job_id: &str) -> Result<()> {
        let exists: bool = self
            .query(redis::cmd("EXISTS").arg(self.keys.job(job_id)))
            .await?;
        if exists {
            Ok(())
        } else {
            Err(StoreError::not_found("job", job_id))
        }
    }

    /// Creates the consumer group at the start of the stream unless this
    /// store already knows it exists.
    async fn ensure_group(&self, stream: &str, group: &str) -> Result<()> {
        let known = (stream.to_owned(), group.to_owned());
        if self
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&known)
        {
            return Ok(());
        }
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match created {
            Ok(()) => {}
            Err(err) if is_code(&err, "BUSYGROUP") => {}
            Err(err) => return Err(err.into()),
        }
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(known);
        Ok(())
    }

    fn forget_group(&self, stream: &str, group: &str) {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(stream.to_owned(), group.to_owned()));
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> redis::RedisResult<Option<StreamReadReply>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count);
        if block.is_zero() {
            cmd.arg("STREAMS").arg(stream).arg(">");
            cmd.query_async(&mut self.conn()).await
        } else {
            // BLOCK 0 would wait forever.
            let ms = ttl_millis(block).max(1);
            cmd.arg("BLOCK").arg(ms).arg("STREAMS").arg(stream).arg(">");
            self.query_blocking(&cmd, block).await
        }
    }

    async fn fetch_members(&self, ids: Vec<String>) -> Result<Vec<MemberRecord>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(self.keys.member(id))
                .arg(&["data", "status", "rev", "deadline"]);
        }
        let replies: Vec<Value> = pipe.query_async(&mut self.conn()).await?;
        let mut members = Vec::new();
        for (id, reply) in ids.iter().zip(replies) {
            let key = self.keys.member(id);
            if let Some(record) = member_record(&array(reply, &key)?, &key)? {
                members.push(record);
            }
        }
        members.sort_by(|a, b| a.member.member_id.cmp(&b.member.member_id));
        Ok(members)
    }
}

#[async_trait]
impl Store for RedisStore {
    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    async fn create_job(
        &self,
        job: Job,
        owner: &str,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<CreateOutcome> {
        validate_job(&job)?;
        require_non_empty("owner", owner)?;
        if let Some(key) = &idempotency {
            require_non_empty("idempotency.key", &key.key)?;
        }
        let field = idempotency
            .as_ref()
            .map(|k| idempotency_field(owner, &k.key))
            .unwrap_or_default();
        let (key, sha) = idempotency
            .map(|k| (k.key, k.spec_sha256))
            .unwrap_or_default();
        let what = self.keys.job(&job.job_id);
        let mut call = self.scripts.create_job.prepare_invoke();
        call.key(self.keys.job(&job.job_id))
            .key(self.keys.jobs())
            .key(self.keys.job_seq())
            .key(self.keys.idempotency())
            .key(self.keys.owner_active(owner))
            .key(self.keys.jobs_by_state(job.state))
            .arg(&job.job_id)
            .arg(job.encode_to_vec())
            .arg(owner)
            .arg(&field)
            .arg(&key)
            .arg(&sha)
            .arg(job.state)
            .arg(if is_active(job.state) { "1" } else { "0" })
            .arg(self.keys.namespace("job"));
        let reply: Value = call.invoke_async(&mut self.conn()).await?;
        let (status, items) = status_reply(reply, &what)?;
        match status.as_str() {
            "created" => Ok(CreateOutcome::Created(StoredJob {
                job,
                revision: 1,
                owner: owner.to_owned(),
            })),
            "existing" => {
                let job_id = items.get(1).and_then(text_of).unwrap_or_default();
                let key = self.keys.job(job_id);
                stored_job(&items[2.min(items.len())..], &key)?
                    .map(CreateOutcome::Existing)
                    .ok_or_else(|| StoreError::decode(key, "idempotency key names a missing job"))
            }
            "reused" => Ok(CreateOutcome::KeyReused {
                job_id: items
                    .get(1)
                    .and_then(text_of)
                    .unwrap_or_default()
                    .to_owned(),
            }),
            "exists" => Err(StoreError::Conflict {
                kind: "job",
                id: job.job_id,
                message: "the job id is taken".into(),
            }),
            other => Err(unexpected(&what, other)),
        }
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<StoredJob>> {
        let key = self.keys.job(job_id);
        let fields: Vec<Value> = self
            .query(redis::cmd("HMGET").arg(&key).arg(&["data", "rev", "owner"]))
            .await?;
        stored_job(&fields, &key)
    }

    async fn list_jobs(
        &self,
        owner: Option<&str>,
        states: &[JobState],
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<JobPage> {
        let below = decode_page_token(page_token, states)?;
        let size = effective_page_size(page_size);
        let sources: Vec<String> = if states.is_empty() {
            vec![self.keys.jobs()]
        } else {
            let unique: BTreeSet<i32> = states.iter().map(|s| *s as i32).collect();
            unique
                .into_iter()
                .map(|s| self.keys.jobs_by_state(s))
                .collect()
        };
        // Candidates come newest first, a batch at a time, until a page is
        // full or none are left; the owner filter may skip many of them.
        let mut max = below.map_or_else(|| "+inf".to_owned(), |seq| format!("({seq}"));
        let mut jobs = Vec::new();
        let mut last_seq = 0;
        loop {
            let mut candidates: Vec<(u64, String)> = Vec::new();
            for source in &sources {
                let found: Vec<(String, f64)> = self
                    .query(
                        redis::cmd("ZREVRANGEBYSCORE")
                            .arg(source)
                            .arg(&max)
                            .arg("-inf")
                            .arg("WITHSCORES")
                            .arg("LIMIT")
                            .arg(0)
                            .arg(size + 1),
                    )
                    .await?;
                // Creation sequences are integers well below 2^53.
                candidates.extend(found.into_iter().map(|(id, score)| (score as u64, id)));
            }
            candidates.sort_by(|a, b| b.cmp(a));
            candidates.dedup();
            let exhausted = candidates.len() <= size;
            candidates.truncate(size + 1);
            if candidates.is_empty() {
                return Ok(JobPage {
                    jobs,
                    next_page_token: None,
                });
            }
            let mut pipe = redis::pipe();
            for (_, id) in &candidates {
                pipe.cmd("HMGET")
                    .arg(self.keys.job(id))
                    .arg(&["data", "rev", "owner"]);
            }
            let replies: Vec<Value> = pipe.query_async(&mut self.conn()).await?;
            for ((seq, id), reply) in candidates.iter().zip(replies) {
                let key = self.keys.job(id);
                let Some(stored) = stored_job(&array(reply, &key)?, &key)? else {
                    continue;
                };
                if !state_matches(states, stored.job.state)
                    || owner.is_some_and(|o| o != stored.owner)
                {
                    continue;
                }
                if jobs.len() == size {
                    return Ok(JobPage {
                        jobs,
                        next_page_token: Some(encode_page_token(last_seq, states)),
                    });
                }
                jobs.push(stored);
                last_seq = *seq;
            }
            if exhausted {
                return Ok(JobPage {
                    jobs,
                    next_page_token: None,
                });
            }
            let oldest = candidates.last().map_or(0, |(seq, _)| *seq);
            max = format!("({oldest}");
        }
    }

    async fn update_job(
        &self,
        job: Job,
        expected_revision: u64,
        events: Vec<JobEvent>,
    ) -> Result<StoredJob> {
        validate_job(&job)?;
        validate_events(&events)?;
        let what = self.keys.job(&job.job_id);
        let mut call = self.scripts.update_job.prepare_invoke();
        call.key(self.keys.job(&job.job_id))
            .key(self.keys.events(&job.job_id))
            .key(self.keys.metric_steps(&job.job_id))
            .arg(&job.job_id)
            .arg(expected_revision)
            .arg(job.encode_to_vec())
            .arg(job.state)
            .arg(if is_active(job.state) { "1" } else { "0" })
            .arg(self.keys.namespace("jobs_by_state"))
            .arg(self.keys.namespace("owner_active"));
        for arg in event_args(&events) {
            call.arg(arg);
        }
        let reply: Value = call.invoke_async(&mut self.conn()).await?;
        let (status, items) = status_reply(reply, &what)?;
        match status.as_str() {
            "ok" => Ok(StoredJob {
                revision: u64_at(&items, 1, &what)?,
                owner: items
                    .get(2)
                    .and_then(text_of)
                    .unwrap_or_default()
                    .to_owned(),
                job,
            }),
            "missing" => Err(StoreError::not_found("job", job.job_id)),
            "conflict" => Err(StoreError::Conflict {
                kind: "job",
                message: format!(
                    "expected revision {expected_revision}, found {}",
                    items.get(1).and_then(text_of).unwrap_or("?")
                ),
                id: job.job_id,
            }),
            "terminal" => {
                let from = items
                    .get(1)
                    .and_then(text_of)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                Err(check_transition(&job.job_id, from, job.state)
                    .err()
                    .unwrap_or_else(|| unexpected(&what, "terminal")))
            }
            other => Err(unexpected(&what, other)),
        }
    }

    async fn count_jobs_by_state(&self) -> Result<BTreeMap<JobState, u64>> {
        let mut pipe = redis::pipe();
        for state in STORABLE_STATES {
            pipe.cmd("ZCARD").arg(self.keys.jobs_by_state(state as i32));
        }
        let counts: Vec<u64> = pipe.query_async(&mut self.conn()).await?;
        Ok(STORABLE_STATES.into_iter().zip(counts).collect())
    }

    async fn active_jobs_of(&self, owner: &str) -> Result<u64> {
        self.query(redis::cmd("SCARD").arg(self.keys.owner_active(owner)))
            .await
    }

    async fn append_events(&self, job_id: &str, events: Vec<JobEvent>) -> Result<u64> {
        validate_events(&events)?;
        let what = self.keys.job(job_id);
        let mut call = self.scripts.append_events.prepare_invoke();
        call.key(self.keys.job(job_id))
            .key(self.keys.events(job_id))
            .key(self.keys.metric_steps(job_id));
        for arg in event_args(&events) {
            call.arg(arg);
        }
        let reply: Value = call.invoke_async(&mut self.conn()).await?;
        let (status, items) = status_reply(reply, &what)?;
        match status.as_str() {
            "ok" => u64_at(&items, 1, &what),
            "missing" => Err(StoreError::not_found("job", job_id)),
            other => Err(unexpected(&what, other)),
        }
    }

    async fn read_events(
        &self,
        job_id: &str,
        after_sequence: u64,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<JobEvent>> {
        self.job_exists(job_id).await?;
        let key = self.keys.events(job_id);
        let mut range = redis::cmd("XRANGE");
        range
            .arg(&key)
            .arg(format!("{}-0", after_sequence.saturating_add(1)))
            .arg("+");
        if limit > 0 {
            range.arg("COUNT").arg(limit);
        }
        let stored: StreamRangeReply = self.query(&range).await?;
        if !stored.ids.is_empty() || wait.is_zero() {
            return stored
                .ids
                .iter()
                .map(|e| event_from_entry(e, &key))
                .collect();
        }
        // Nothing yet: wait for entries after the same position, so one
        // appended in between is returned at once.
        let mut read = redis::cmd("XREAD");
        if limit > 0 {
            read.arg("COUNT").arg(limit);
        }
        read.arg("BLOCK")
            .arg(ttl_millis(wait).max(1))
            .arg("STREAMS")
            .arg(&key)
            .arg(format!("{after_sequence}-0"));
        let reply: Option<StreamReadReply> = self.query_blocking(&read, wait).await?;
        reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|e| event_from_entry(&e, &key))
            .collect()
    }

    async fn metrics(
        &self,
        job_id: &str,
        after_step: u64,
        limit: usize,
    ) -> Result<Vec<MetricPoint>> {
        self.job_exists(job_id).await?;
        let key = self.keys.events(job_id);
        let limit: i64 = if limit == 0 {
            -1
        } else {
            i64::try_from(limit).unwrap_or(i64::MAX)
        };
        let mut call = self.scripts.metrics.prepare_invoke();
        call.key(self.keys.metric_steps(job_id))
            .key(&key)
            .arg(after_step)
            .arg(limit);
        let payloads: Vec<Vec<u8>> = call.invoke_async(&mut self.conn()).await?;
        let mut points = Vec::with_capacity(payloads.len());
        for bytes in payloads {
            let event: JobEvent = decode(&bytes, || format!("{key} metric event"))?;
            if let Some(job_event::Event::Metrics(point)) = event.event {
                points.push(point);
            }
        }
        Ok(points)
    }

    async fn register_member(&self, member: Member, lease_ttl: Duration) -> Result<Registration> {
        validate_member(&member)?;
        let now = self.clock.now();
        let deadline = deadline_millis(now, lease_ttl);
        let key = self.keys.member(&member.member_id);
        let mut call = self.scripts.register_member.prepare_invoke();
        call.key(&key)
            .key(self.keys.member_deadlines())
            .key(self.keys.members_by_role(member.role))
            .key(self.keys.instance(&member.instance_id))
            .arg(&member.member_id)
            .arg(member.encode_to_vec())
            .arg(member.role)
            .arg(&member.instance_id)
            .arg(deadline)
            .arg(millis(now))
            .arg(self.keys.namespace("member"));
        let reply: Value = call.invoke_async(&mut self.conn()).await?;
        let (status, items) = status_reply(reply, &key)?;
        match status.as_str() {
            "registered" => Ok(Registration::Registered(MemberRecord {
                member,
                status: None,
                revision: 1,
                lease_deadline: from_millis(deadline),
            })),
            "existing" => member_record(&items[1..], &key)?
                .map(Registration::Existing)
                .ok_or_else(|| StoreError::decode(key, "instance names a missing member")),
            "exists" => Err(StoreError::Conflict {
                kind: "member",
                id: member.member_id,
                message: "the member id is taken".into(),
            }),
            other => Err(unexpected(&key, other)),
        }
    }

    async fn update_member(&self, member: Member, expected_revision: u64) -> Result<MemberRecord> {
        validate_member(&member)?;
        let key = self.keys.member(&member.member_id);
        let mut call = self.scripts.update_member.prepare_invoke();
        call.key(&key)
            .arg(expected_revision)
            .arg(member.encode_to_vec())
            .arg(member.role)
            .arg(&member.instance_id);
        let reply: Value = call.invoke_async(&mut self.conn()).await?;
        let (status, items) = status_reply(reply, &key)?;
        match status.as_str() {
            "ok" => {
                let status = match items.get(2).and_then(bytes_of) {
                    Some(bytes) => Some(decode(bytes, || format!("{key} field status"))?),
                    None => None,
                };
                Ok(MemberRecord {
                    member,
                    status,
                    revision: u64_at(&items, 1, &key)?,
                    lease_deadline: from_millis(u64_at(&items, 3, &key)?),
                })
            }
            "missing" => Err(StoreError::not_found("member", member.member_id)),
            "conflict" => Err(StoreError::Conflict {
                kind: "member",
                message: format!(
                    "expected revision {expected_revision}, found {}",
                    items.get(1).and_then(text_of).unwrap_or("?")
                ),
                id: member.member_id,
            }),
            "role" => Err(StoreError::invalid("member.role", "cannot change")),
            "instance" => Err(StoreError::invalid("member.instance_id", "cannot change")),
            other => Err(unexpected(&key, other)),
        }
    }

    async fn renew_lease(
        &self,
        member_id: &str,
        lease_ttl: Duration,
        status: Option<MemberStatus>,
    ) -> Result<MemberRecord> {
        let now = self.clock.now();
        let deadline = deadline_millis(now, lease_ttl);
        let key = self.keys.member(member_id);
        let mut call = self.scripts.renew_lease.prepare_invoke();
        call.key(&key)
            .key(self.keys.member_deadlines())
            .arg(member_id)
            .arg(millis(now))
            .arg(deadline)
            .arg(
                status
                    .as_ref()
                    .map(Message::encode_to_vec)
                    .unwrap_or_default(),
            )
            .arg(if status.is_some() { "1" } else { "0" });
        let reply: Value = call.invoke_async(&mut self.conn()).await?;
        let (word, mut items) = status_reply(reply, &key)?;
        match word.as_str() {
            "ok" => {
                // Shape it like an HMGET of data, status, rev, deadline.
                items.remove(0);
                items.push(Value::Int(i64::try_from(deadline).unwrap_or(i64::MAX)));
                member_record(&items, &key)?
                    .ok_or_else(|| StoreError::decode(key, "renewed member has no data"))
            }
            "expired" => Err(StoreError::LeaseExpired {
                member_id: member_id.to_owned(),
            }),
            other => Err(unexpected(&key, other)),
        }
    }

    async fn get_member(&self, member_id: &str) -> Result<Option<MemberRecord>> {
        let key = self.keys.member(member_id);
        let fields: Vec<Value> = self
            .query(
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&["data", "status", "rev", "deadline"]),
            )
            .await?;
        member_record(&fields, &key)
    }

    async fn member_by_instance(&self, instance_id: &str) -> Result<Option<MemberRecord>> {
        let member_id: Option<String> = self
            .query(redis::cmd("GET").arg(self.keys.instance(instance_id)))
            .await?;
        match member_id {
            Some(id) => self.get_member(&id).await,
            None => Ok(None),
        }
    }

    async fn list_members(&self, role: Option<Role>) -> Result<Vec<MemberRecord>> {
        let ids: Vec<String> = match role {
            Some(role) => {
                self.query(redis::cmd("SMEMBERS").arg(self.keys.members_by_role(role as i32)))
                    .await?
            }
            None => {
                self.query(
                    redis::cmd("ZRANGE")
                        .arg(self.keys.member_deadlines())
                        .arg(0)
                        .arg(-1),
                )
                .await?
            }
        };
        self.fetch_members(ids).await
    }

    async fn expired_members(&self) -> Result<Vec<MemberRecord>> {
        let now = millis(self.clock.now());
        let ids: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys.member_deadlines())
                    .arg("-inf")
                    .arg(now),
            )
            .await?;
        let members = self.fetch_members(ids).await?;
        // A lease renewed between the two reads is alive again.
        Ok(members
            .into_iter()
            .filter(|m| millis(m.lease_deadline) <= now)
            .collect())
    }

    async fn remove_member(&self, member_id: &str) -> Result<bool> {
        let mut call = self.scripts.remove_member.prepare_invoke();
        call.key(self.keys.member(member_id))
            .key(self.keys.member_deadlines())
            .arg(member_id)
            .arg(self.keys.namespace("members_by_role"))
            .arg(self.keys.namespace("instance"));
        let removed: i64 = call.invoke_async(&mut self.conn()).await?;
        Ok(removed == 1)
    }

    async fn put_manifest(&self, manifest: WeightManifest) -> Result<ManifestPut> {
        let (job_id, version, sha) = manifest_identity(&manifest)?;
        let key = self.keys.manifests(&job_id);
        let mut call = self.scripts.put_manifest.prepare_invoke();
        call.key(&key)
            .key(self.keys.manifest_versions(&job_id))
            .key(self.keys.manifest_high(&job_id))
            .arg(version)
            .arg(manifest.encode_to_vec());
        let reply: Value = call.invoke_async(&mut self.conn()).await?;
        let (status, items) = status_reply(reply, &key)?;
        match status.as_str() {
            "committed" => Ok(ManifestPut::Committed(manifest)),
            "exists" => {
                let existing: WeightManifest = decode(bytes_at(&items, 1, &key)?, || {
                    format!("{key} field {version}")
                })?;
                check_same_manifest(&existing, &job_id, version, &sha)?;
                Ok(ManifestPut::AlreadyCommitted(existing))
            }
            "not_monotonic" => Err(StoreError::VersionNotMonotonic {
                latest: u64_at(&items, 1, &key)?,
                job_id,
                version,
            }),
            other => Err(unexpected(&key, other)),
        }
    }

    async fn get_manifest(&self, job_id: &str, version: u64) -> Result<Option<WeightManifest>> {
        let key = self.keys.manifests(job_id);
        let bytes: Option<Vec<u8>> = self
            .query(redis::cmd("HGET").arg(&key).arg(version))
            .await?;
        bytes
            .map(|b| decode(&b, || format!("{key} field {version}")))
            .transpose()
    }

    async fn latest_manifest(&self, job_id: &str) -> Result<Option<WeightManifest>> {
        let latest: Vec<u64> = self
            .query(
                redis::cmd("ZREVRANGE")
                    .arg(self.keys.manifest_versions(job_id))
                    .arg(0)
                    .arg(0),
            )
            .await?;
        match latest.first() {
            Some(version) => self.get_manifest(job_id, *version).await,
            None => Ok(None),
        }
    }

    async fn list_manifests(&self, job_id: &str) -> Result<Vec<WeightManifest>> {
        let key = self.keys.manifests(job_id);
        let all: Vec<(u64, Vec<u8>)> = self.query(redis::cmd("HGETALL").arg(&key)).await?;
        let mut manifests = all
            .into_iter()
            .map(|(version, bytes)| {
                decode::<WeightManifest>(&bytes, || format!("{key} field {version}"))
                    .map(|m| (version, m))
            })
            .collect::<Result<Vec<_>>>()?;
        manifests.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
        Ok(manifests.into_iter().map(|(_, m)| m).collect())
    }

    async fn delete_manifest(&self, job_id: &str, version: u64) -> Result<bool> {
        let key = self.keys.manifests(job_id);
        let mut call = self.scripts.delete_manifest.prepare_invoke();
        call.key(&key)
            .key(self.keys.manifest_versions(job_id))
            .key(self.keys.pins(job_id))
            .arg(version)
            .arg(millis(self.clock.now()));
        let outcome: String = call.invoke_async(&mut self.conn()).await?;
        match outcome.as_str() {
            "deleted" => Ok(true),
            "missing" => Ok(false),
            "pinned" => Err(StoreError::Pinned {
                job_id: job_id.to_owned(),
                version,
            }),
            other => Err(unexpected(&key, other)),
        }
    }

    async fn pin(
        &self,
        job_id: &str,
        version: u64,
        holder: &str,
        ttl: Duration,
    ) -> Result<SystemTime> {
        require_non_empty("holder", holder)?;
        let deadline = deadline_millis(self.clock.now(), ttl);
        let mut call = self.scripts.pin.prepare_invoke();
        call.key(self.keys.manifests(job_id))
            .key(self.keys.pins(job_id))
            .arg(version)
            .arg(format!("{version}:{holder}"))
            .arg(deadline);
        let pinned: i64 = call.invoke_async(&mut self.conn()).await?;
        if pinned == 1 {
            Ok(from_millis(deadline))
        } else {
            Err(StoreError::not_found(
                "weight version",
                version_id(job_id, version),
            ))
        }
    }

    async fn unpin(&self, job_id: &str, version: u64, holder: &str) -> Result<bool> {
        let removed: i64 = self
            .query(
                redis::cmd("ZREM")
                    .arg(self.keys.pins(job_id))
                    .arg(format!("{version}:{holder}")),
            )
            .await?;
        Ok(removed == 1)
    }

    async fn pinned_versions(&self, job_id: &str) -> Result<BTreeSet<u64>> {
        let key = self.keys.pins(job_id);
        let now = millis(self.clock.now());
        let live: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg(format!("({now}"))
                    .arg("+inf"),
            )
            .await?;
        live.iter()
            .map(|pin| {
                pin.split_once(':')
                    .and_then(|(version, _)| version.parse().ok())
                    .ok_or_else(|| StoreError::decode(&key, format!("malformed pin {pin:?}")))
            })
            .collect()
    }

    async fn queue_append(
        &self,
        job_id: &str,
        payload: Vec<u8>,
        max_len: u64,
    ) -> Result<AppendOutcome> {
        require_non_empty("job_id", job_id)?;
        if max_len == 0 {
            return Err(StoreError::invalid("max_len", "must be at least 1"));
        }
        let key = self.keys.queue(job_id);
        let mut call = self.scripts.queue_append.prepare_invoke();
        call.key(&key).arg(max_len).arg(payload);
        let reply: Vec<Value> = call.invoke_async(&mut self.conn()).await?;
        match reply.first().and_then(u64_of) {
            Some(1) => {
                let id = reply
                    .get(1)
                    .and_then(text_of)
                    .ok_or_else(|| StoreError::decode(&key, "XADD returned no id"))?;
                Ok(AppendOutcome::Appended(id.parse().map_err(|_| {
                    StoreError::decode(&key, format!("malformed entry id {id:?}"))
                })?))
            }
            Some(0) => Ok(AppendOutcome::Full {
                len: u64_at(&reply, 1, &key)?,
            }),
            _ => Err(StoreError::decode(
                &key,
                format!("unexpected reply {reply:?}"),
            )),
        }
    }

    async fn queue_read(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<QueueEntry>> {
        validate_queue_args(group, consumer, count)?;
        let key = self.keys.queue(job_id);
        self.ensure_group(&key, group).await?;
        let reply = match self.read_group(&key, group, consumer, count, block).await {
            // The stream (and with it the group) was deleted behind our
            // back, e.g. by a FLUSHALL: recreate it once.
            Err(err) if is_code(&err, "NOGROUP") => {
                self.forget_group(&key, group);
                self.ensure_group(&key, group).await?;
                self.read_group(&key, group, consumer, count, block).await?
            }
            other => other?,
        };
        reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|entry| queue_entry(&entry, &key))
            .collect()
    }

    async fn queue_ack(&self, job_id: &str, group: &str, ids: &[EntryId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let unique: BTreeSet<EntryId> = ids.iter().copied().collect();
        let mut call = self.scripts.queue_ack.prepare_invoke();
        call.key(self.keys.queue(job_id)).arg(group);
        for id in unique {
            call.arg(id.to_string());
        }
        match call.invoke_async::<u64>(&mut self.conn()).await {
            Ok(n) => Ok(n),
            Err(err) if err.to_string().contains("NOGROUP") => Ok(0),
            Err(err) => Err(err.into()),
        }
    }

    async fn queue_claim_stale(
        &self,
        job_id: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<QueueEntry>> {
        validate_queue_args(group, consumer, count)?;
        let key = self.keys.queue(job_id);
        let mut claimed = Vec::new();
        let mut cursor = "0-0".to_owned();
        loop {
            let reply: redis::RedisResult<StreamAutoClaimReply> = redis::cmd("XAUTOCLAIM")
                .arg(&key)
                .arg(group)
                .arg(consumer)
                .arg(ttl_millis(min_idle))
                .arg(&cursor)
                .arg("COUNT")
                .arg(count - claimed.len())
                .query_async(&mut self.conn())
                .await;
            let reply = match reply {
                Ok(reply) => reply,
                Err(err) if is_code(&err, "NOGROUP") => return Ok(Vec::new()),
                Err(err) => return Err(err.into()),
            };
            for entry in &reply.claimed {
                claimed.push(queue_entry(entry, &key)?);
            }
            cursor = reply.next_stream_id;
            if cursor == "0-0" || claimed.len() >= count {
                return Ok(claimed);
            }
        }
    }

    async fn queue_len(&self, job_id: &str) -> Result<u64> {
        self.query(redis::cmd("XLEN").arg(self.keys.queue(job_id)))
            .await
    }

    async fn queue_pending(&self, job_id: &str, group: &str) -> Result<u64> {
        let key = self.keys.queue(job_id);
        let reply: redis::RedisResult<Value> = redis::cmd("XPENDING")
            .arg(&key)
            .arg(group)
            .query_async(&mut self.conn())
            .await;
        match reply {
            Ok(Value::Array(summary)) => u64_at(&summary, 0, &format!("{key} XPENDING")),
            Ok(other) => Err(StoreError::decode(
                &key,
                format!("XPENDING replied {other:?}"),
            )),
            Err(err) if is_code(&err, "NOGROUP") => Ok(0),
            Err(err) => Err(err.into()),
        }
    }

    async fn queue_appended(&self, job_id: &str) -> Result<u64> {
        // A stream counts every XADD in `entries-added` (Redis 7), XDEL
        // notwithstanding.
        let key = self.keys.queue(job_id);
        let reply: redis::RedisResult<Value> = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&key)
            .query_async(&mut self.conn())
            .await;
        let fields: Vec<(Value, Value)> = match reply {
            Ok(Value::Map(fields)) => fields,
            Ok(Value::Array(flat)) => {
                let mut flat = flat.into_iter();
                std::iter::from_fn(|| Some((flat.next()?, flat.next()?))).collect()
            }
            Ok(other) => {
                return Err(StoreError::decode(
                    &key,
                    format!("XINFO STREAM replied {other:?}"),
                ));
            }
            Err(err) if err.to_string().contains("no such key") => return Ok(0),
            Err(err) => return Err(err.into()),
        };
        fields
            .iter()
            .find(|(name, _)| text_of(name) == Some("entries-added"))
            .and_then(|(_, value)| u64_of(value))
            .ok_or_else(|| {
                StoreError::decode(
                    &key,
                    "XINFO STREAM has no entries-added (Redis 7 or later is needed)",
                )
            })
    }

    async fn put_preference(&self, rater: &str, key: &str, payload: Vec<u8>) -> Result<RecordPut> {
        require_non_empty("rater", rater)?;
        require_non_empty("key", key)?;
        let mut call = self.scripts.put_preference.prepare_invoke();
        call.key(self.keys.preference_keys())
            .key(self.keys.preferences())
            .key(self.keys.preference_seq())
            .arg(idempotency_field(rater, key))
            .arg(payload);
        let reply: Vec<Value> = call.invoke_async(&mut self.conn()).await?;
        let what = self.keys.preferences();
        let seq = u64_at(&reply, 1, &what)?;
        match reply.first().and_then(u64_of) {
            Some(1) => Ok(RecordPut::Stored(seq)),
            Some(0) => Ok(RecordPut::Duplicate(seq)),
            _ => Err(StoreError::decode(&what, "unexpected PUT_PREFERENCE reply")),
        }
    }

    async fn list_preferences(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        // Sequences are dense (1, 2, 3...), so the next `limit` are known.
        if limit == 0 {
            return Ok(Vec::new());
        }
        let last: Option<u64> = self
            .query(redis::cmd("GET").arg(self.keys.preference_seq()))
            .await?;
        let last = last.unwrap_or(0);
        let seqs: Vec<u64> = (after.saturating_add(1)..=last).take(limit).collect();
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let payloads: Vec<Option<Vec<u8>>> = self
            .query(redis::cmd("HMGET").arg(self.keys.preferences()).arg(&seqs))
            .await?;
        Ok(seqs
            .into_iter()
            .zip(payloads)
            .filter_map(|(seq, payload)| payload.map(|p| (seq, p)))
            .collect())
    }

    async fn put_clip(&self, clip_id: &str, payload: Vec<u8>, ttl: Duration) -> Result<()> {
        require_non_empty("clip_id", clip_id)?;
        // The expiry is the store clock's (as pins'), so a clip expires at
        // the same moment on both backends; Redis forgets it a minute
        // later on its own clock.
        let expires = deadline_millis(self.clock.now(), ttl);
        let key = self.keys.clip(clip_id);
        let keep_ms = ttl_millis(ttl).saturating_add(60_000);
        let _: () = redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("payload")
            .arg(payload)
            .arg("expires_ms")
            .arg(expires)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(keep_ms)
            .ignore()
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn get_clip(&self, clip_id: &str) -> Result<Option<Vec<u8>>> {
        let key = self.keys.clip(clip_id);
        let (payload, expires): (Option<Vec<u8>>, Option<u64>) = self
            .query(
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg("payload")
                    .arg("expires_ms"),
            )
            .await?;
        let now = millis(self.clock.now());
        Ok(payload.filter(|_| expires.is_some_and(|e| e > now)))
    }
}
