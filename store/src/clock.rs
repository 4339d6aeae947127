//! Wall-clock time as the store sees it, injectable so that lease and pin
//! expiry can be tested without sleeping.
//!
//! Both backends take every lease deadline and pin deadline from the
//! [`Clock`] they were built with (the Redis backend passes `now` into its
//! Lua scripts rather than reading Redis' own clock), so one [`ManualClock`]
//! drives expiry in tests of either backend. The one exception is the idle
//! time of rollout-queue entries on Redis, which Redis measures itself
//! (`XAUTOCLAIM`'s min-idle-time).

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The real clock ([`SystemTime::now`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to; clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<SystemTime>>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// A clock standing at the current real time, rounded down to whole
    /// milliseconds (the resolution both backends store).
    pub fn starting_now() -> Self {
        Self::new(from_millis(millis(SystemTime::now())))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: SystemTime) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Milliseconds since the Unix epoch (0 for times before it), the unit both
/// backends store deadlines in.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`millis`].
pub fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// `now + ttl` in milliseconds, saturating.
pub(crate) fn deadline_millis(now: SystemTime, ttl: Duration) -> u64 {
    millis(now).saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}
