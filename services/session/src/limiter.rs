//! Per-user rate limit: one token bucket per (tenant, user), in process memory.
//!
//! Each request takes one token; a bucket holds at most `burst` tokens and refills at
//! `rate_per_s`. A request that finds less than one token is refused with the time until one
//! is there (the `retry_after_ms` hint).
//!
//! The buckets live in each replica's memory: with several session replicas a user's queries
//! spread over them (the ADMITTED consumer is shared), so each replica enforces its own share
//! and a user may get up to `replicas × rate` through in total. Divide `--rate-per-s` and
//! `--burst` by the replica count for a mesh-wide limit. Buckets of users gone quiet (full
//! again) are swept once the table grows, so memory follows the active users.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where "now" comes from (injected so tests control time).
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

/// The process's monotonic clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A rate and a burst; the limiter is off when the rate is not positive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub rate_per_s: f64,
    pub burst: f64,
}

/// One user's bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self { tokens: limit.burst, last: now }
    }

    fn refill(&mut self, limit: RateLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.rate_per_s).min(limit.burst);
        self.last = self.last.max(now);
    }

    /// Takes a token, or says how long until one is there.
    pub fn try_take(&mut self, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        self.refill(limit, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / limit.rate_per_s))
        }
    }

    /// Whether the bucket has refilled completely (it may be forgotten: a new one is the same).
    pub fn is_full(&self, limit: RateLimit, now: Instant) -> bool {
        let mut b = *self;
        b.refill(limit, now);
        b.tokens >= limit.burst
    }
}

/// What the limiter says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Limited { retry_after: Duration },
}

/// The buckets of every (tenant, user) this replica has seen recently.
pub struct RateLimiter {
    limit: Option<RateLimit>,
    clock: Arc<dyn Clock>,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    by_user: HashMap<(String, String), TokenBucket>,
    /// The table size at which full buckets are next swept.
    sweep_at: usize,
}

const SWEEP_FLOOR: usize = 1024;

impl RateLimiter {
    /// `rate_per_s <= 0` turns the limit off. A burst below 1 is taken as 1 (else nothing
    /// would ever pass).
    pub fn new(rate_per_s: f64, burst: u32, clock: Arc<dyn Clock>) -> Self {
        let limit = (rate_per_s > 0.0).then_some(RateLimit { rate_per_s, burst: f64::from(burst.max(1)) });
        Self { limit, clock, buckets: Mutex::new(Buckets { by_user: HashMap::new(), sweep_at: SWEEP_FLOOR }) }
    }

    pub fn check(&self, tenant: &str, user: &str) -> Decision {
        let Some(limit) = self.limit else { return Decision::Allowed };
        let now = self.clock.now();
        let mut buckets = self.buckets.lock().expect("limiter lock");
        if buckets.by_user.len() >= buckets.sweep_at {
            buckets.by_user.retain(|_, b| !b.is_full(limit, now));
            buckets.sweep_at = (buckets.by_user.len() * 2).max(SWEEP_FLOOR);
        }
        let bucket = match buckets.by_user.get_mut(&(tenant.to_owned(), user.to_owned())) {
            Some(b) => b,
            None => buckets.by_user.entry((tenant.to_owned(), user.to_owned())).or_insert(TokenBucket::new(limit, now)),
        };
        match bucket.try_take(limit, now) {
            Ok(()) => Decision::Allowed,
            Err(retry_after) => Decision::Limited { retry_after },
        }
    }

    /// Buckets held (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().expect("limiter lock").by_user.len()
    }
}

/// A hand-driven clock for tests.
pub struct ManualClock {
    now: Mutex<Instant>,
}

impl ManualClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { now: Mutex::new(Instant::now()) })
    }

    pub fn advance(&self, by: Duration) {
        *self.now.lock().expect("clock lock") += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.now.lock().expect("clock lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The retry hint in whole milliseconds (rounded: float refills are not exact).
    fn limited(d: Decision) -> u64 {
        match d {
            Decision::Limited { retry_after } => (retry_after.as_secs_f64() * 1000.0).round() as u64,
            Decision::Allowed => panic!("allowed"),
        }
    }

    #[test]
    fn a_burst_passes_then_the_rate_rules() {
        let clock = ManualClock::new();
        let limiter = RateLimiter::new(5.0, 10, clock.clone());
        for _ in 0..10 {
            assert_eq!(limiter.check("t", "alice"), Decision::Allowed);
        }
        // Empty: the next token is 1/5 s away.
        assert_eq!(limited(limiter.check("t", "alice")), 200);
        clock.advance(Duration::from_millis(100));
        assert_eq!(limited(limiter.check("t", "alice")), 100);
        clock.advance(Duration::from_millis(101));
        assert_eq!(limiter.check("t", "alice"), Decision::Allowed);
        assert!(matches!(limiter.check("t", "alice"), Decision::Limited { .. }));
        // One second refills five tokens, never more than the burst.
        clock.advance(Duration::from_secs(1));
        for _ in 0..5 {
            assert_eq!(limiter.check("t", "alice"), Decision::Allowed);
        }
        assert!(matches!(limiter.check("t", "alice"), Decision::Limited { .. }));
        clock.advance(Duration::from_secs(3600));
        for _ in 0..10 {
            assert_eq!(limiter.check("t", "alice"), Decision::Allowed);
        }
        assert!(matches!(limiter.check("t", "alice"), Decision::Limited { .. }));
    }

    #[test]
    fn users_and_tenants_have_their_own_buckets() {
        let clock = ManualClock::new();
        let limiter = RateLimiter::new(1.0, 1, clock);
        assert_eq!(limiter.check("t", "alice"), Decision::Allowed);
        assert!(matches!(limiter.check("t", "alice"), Decision::Limited { .. }));
        assert_eq!(limiter.check("t", "bob"), Decision::Allowed);
        assert_eq!(limiter.check("u", "alice"), Decision::Allowed);
    }

    #[test]
    fn a_zero_rate_turns_the_limit_off() {
        let limiter = RateLimiter::new(0.0, 1, ManualClock::new());
        for _ in 0..100 {
            assert_eq!(limiter.check("t", "alice"), Decision::Allowed);
        }
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn quiet_users_buckets_are_swept_when_the_table_grows() {
        let clock = ManualClock::new();
        let limiter = RateLimiter::new(10.0, 2, clock.clone());
        for i in 0..SWEEP_FLOOR {
            limiter.check("t", &format!("u{i}"));
        }
        assert_eq!(limiter.tracked(), SWEEP_FLOOR);
        clock.advance(Duration::from_secs(1));
        limiter.check("t", "busy");
        assert_eq!(limiter.tracked(), 1, "full buckets are forgotten");
        limiter.check("t", "busy");
        assert!(matches!(limiter.check("t", "busy"), Decision::Limited { .. }), "the live bucket is kept");
    }

    #[test]
    fn a_clock_going_backwards_does_not_mint_tokens() {
        let limit = RateLimit { rate_per_s: 1.0, burst: 1.0 };
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(limit, t0);
        assert!(b.try_take(limit, t0).is_ok());
        assert!(b.try_take(limit, t0 - Duration::from_secs(5)).is_err());
        assert!(b.try_take(limit, t0 + Duration::from_millis(999)).is_err());
        assert!(b.try_take(limit, t0 + Duration::from_secs(1)).is_ok());
    }
}
