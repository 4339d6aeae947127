//! Rate limits on raters: each rater's own, and one over all raters
//! together.
//!
//! Rater ids are whatever the listening page sends, so a per-rater limit
//! alone is no limit: a client that makes up a new id per request is never
//! slowed down, and each new id would grow the limiter's table. So every
//! request first passes the limit over all raters (which bounds what any
//! number of ids can do), then its rater's own; and the table holds at most
//! `capacity` raters. A rater idle for a minute, whose quota has refilled
//! and whose entry therefore says nothing, makes room for a new one; when
//! no entry can go, a new rater is refused (RESOURCE_EXHAUSTED) rather
//! than let in with a fresh quota at the expense of a rater still limited.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};

use crate::Error;

/// How long a rater must be idle before its entry may go: by then its
/// quota (a minute's worth) has refilled.
const IDLE: Duration = Duration::from_secs(60);

/// A quota of `per_minute`, bursting to a minute's worth.
fn quota(per_minute: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN))
}

/// One rater's limiter and when it was last used.
#[derive(Debug)]
struct Tracked {
    limiter: DefaultDirectRateLimiter,
    last_used: Instant,
}

/// The limits on one kind of request (pairs or comparisons).
#[derive(Debug)]
pub(crate) struct RaterLimits {
    what: &'static str,
    per_rater: u32,
    all_raters: u32,
    capacity: usize,
    all: DefaultDirectRateLimiter,
    raters: Mutex<HashMap<String, Tracked>>,
}

impl RaterLimits {
    /// `per_rater` and `all_raters` requests of kind `what` a minute, over
    /// at most `capacity` raters at a time.
    pub(crate) fn new(
        what: &'static str,
        per_rater: u32,
        all_raters: u32,
        capacity: usize,
    ) -> Self {
        Self {
            what,
            per_rater,
            all_raters,
            capacity: capacity.max(1),
            all: DefaultDirectRateLimiter::direct(quota(all_raters)),
            raters: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `n` requests of `rater` from the quotas, or says why not.
    pub(crate) fn check(&self, rater: &str, n: usize) -> Result<(), Error> {
        let n =
            NonZeroU32::new(u32::try_from(n.max(1)).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        take(&self.all, n).map_err(|retry_after| Error::RateLimited {
            reason: format!(
                "all raters together are over the limit of {} {} a minute",
                self.all_raters, self.what
            ),
            retry_after,
        })?;
        // A poisoned lock only means another request panicked while holding
        // it; the table is still consistent (every change is one insert or
        // remove).
        let mut raters = self
            .raters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if !raters.contains_key(rater) && raters.len() >= self.capacity {
            let idle = raters
                .iter()
                .filter(|(_, t)| now.duration_since(t.last_used) >= IDLE)
                .min_by_key(|(_, t)| t.last_used)
                .map(|(id, _)| id.clone());
            match idle {
                Some(id) => {
                    raters.remove(&id);
                }
                None => {
                    let oldest = raters.values().map(|t| t.last_used).min().unwrap_or(now);
                    return Err(Error::RateLimited {
                        reason: format!(
                            "rater {rater:?} is new and {} raters, the most tracked at once, \
                             asked for {} within the last minute",
                            self.capacity, self.what
                        ),
                        retry_after: IDLE.saturating_sub(now.duration_since(oldest)),
                    });
                }
            }
        }
        let tracked = raters.entry(rater.to_owned()).or_insert_with(|| Tracked {
            limiter: DefaultDirectRateLimiter::direct(quota(self.per_rater)),
            last_used: now,
        });
        tracked.last_used = now;
        take(&tracked.limiter, n).map_err(|retry_after| Error::RateLimited {
            reason: format!(
                "rater {rater:?} is over its limit of {} {} a minute",
                self.per_rater, self.what
            ),
            retry_after,
        })
    }

    /// Raters tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.raters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// A limit over all callers together, on one kind of request.
#[derive(Debug)]
pub(crate) struct GlobalLimit {
    what: &'static str,
    per_minute: u32,
    limiter: DefaultDirectRateLimiter,
}

impl GlobalLimit {
    /// `per_minute` requests of kind `what` a minute, from all callers.
    pub(crate) fn new(what: &'static str, per_minute: u32) -> Self {
        Self {
            what,
            per_minute,
            limiter: DefaultDirectRateLimiter::direct(quota(per_minute)),
        }
    }

    /// Takes one request from the quota, or says why not.
    pub(crate) fn check(&self) -> Result<(), Error> {
        take(&self.limiter, NonZeroU32::MIN).map_err(|retry_after| Error::RateLimited {
            reason: format!(
                "all callers together are over the limit of {} {} a minute",
                self.per_minute, self.what
            ),
            retry_after,
        })
    }
}

/// Takes `n` cells from `limiter`, or the wait before trying again.
fn take(limiter: &DefaultDirectRateLimiter, n: NonZeroU32) -> Result<(), Duration> {
    match limiter.check_n(n) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(not_until.wait_time_from(DefaultClock::default().now())),
        // More than the whole quota at once: never allowed in one go.
        Err(_) => Err(IDLE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(limits: &RaterLimits, rater: &str) -> String {
        limits.check(rater, 1).unwrap_err().to_string()
    }

    #[test]
    fn new_rater_ids_do_not_lift_the_limit_over_all_raters() {
        let limits = RaterLimits::new("pairs", 1, 3, 100);
        limits.check("r1", 1).unwrap();
        // A refused request counts against all raters too.
        let own = refusal(&limits, "r1");
        assert!(own.contains("rater \"r1\""), "{own}");
        limits.check("r2", 1).unwrap();
        let all = refusal(&limits, "r3");
        assert!(all.contains("all raters together"), "{all}");
        assert!(all.contains("3 pairs"), "{all}");
    }

    #[test]
    fn the_table_is_bounded_and_keeps_raters_still_limited() {
        let limits = RaterLimits::new("pairs", 1, 1000, 2);
        for i in 0..2 {
            limits.check(&format!("r{i}"), 1).unwrap();
        }
        // Both are recent, so neither may go: the new one is refused, and
        // a known one is still limited, not reset.
        let full = refusal(&limits, "fresh");
        assert!(
            full.contains("2 raters, the most tracked at once"),
            "{full}"
        );
        assert!(refusal(&limits, "r0").contains("rater \"r0\""));
        assert_eq!(limits.tracked(), 2);
        // Once a rater has been idle for a minute its entry makes room.
        {
            let mut raters = limits.raters.lock().unwrap();
            let old = Instant::now().checked_sub(IDLE).unwrap();
            raters.get_mut("r1").unwrap().last_used = old;
        }
        limits.check("fresh", 1).unwrap();
        assert_eq!(limits.tracked(), 2);
        assert!(refusal(&limits, "r0").contains("rater \"r0\""));
    }
}
