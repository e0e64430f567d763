//! A request's deadline, decided by one rule for every stage.
//!
//! `RequestContext.deadline_unix_ms` is an absolute time in unix epoch milliseconds; 0 — the
//! protobuf default — means the request has none. Ingest only ever sets a deadline between 1 ms
//! and its configured maximum ahead of acceptance and refuses anything else with
//! `bad_deadline`, so a negative value never comes from ingest: should one reach a stage
//! anyway it is read as "none" too, the same way in every stage, rather than "already expired".
use std::time::{Duration, Instant};

use crate::v1::RequestContext;

impl RequestContext {
    /// The deadline in unix epoch milliseconds, or `None` when the request has none.
    pub fn deadline(&self) -> Option<i64> {
        (self.deadline_unix_ms > 0).then_some(self.deadline_unix_ms)
    }

    /// Time left until the deadline at `now_unix_ms` (zero once it has passed), or `None`.
    pub fn time_left(&self, now_unix_ms: i64) -> Option<Duration> {
        self.deadline().map(|at| Duration::from_millis(at.saturating_sub(now_unix_ms).max(0) as u64))
    }

    /// The deadline on the monotonic clock, given now on both clocks, or `None`.
    pub fn deadline_instant(&self, now: Instant, now_unix_ms: i64) -> Option<Instant> {
        self.time_left(now_unix_ms).map(|left| now + left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(deadline_unix_ms: i64) -> RequestContext {
        RequestContext { deadline_unix_ms, ..Default::default() }
    }

    #[test]
    fn zero_and_negative_mean_no_deadline_everywhere() {
        for d in [0, -1, i64::MIN] {
            assert_eq!((ctx(d).deadline(), ctx(d).time_left(1_000)), (None, None), "{d}");
            assert_eq!(ctx(d).deadline_instant(Instant::now(), 1_000), None);
        }
    }

    #[test]
    fn a_deadline_counts_down_and_stops_at_zero() {
        assert_eq!(ctx(1_500).time_left(1_000), Some(Duration::from_millis(500)));
        assert_eq!(ctx(1_500).time_left(2_000), Some(Duration::ZERO));
        let now = Instant::now();
        assert_eq!(ctx(1_250).deadline_instant(now, 1_000), Some(now + Duration::from_millis(250)));
    }
}
