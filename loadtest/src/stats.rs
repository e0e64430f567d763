//! Latency histograms (HDR, microsecond resolution, 3 significant figures), per-phase tallies
//! and the per-second timeline.
use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use millrace_proto::v1::TerminalStatus;

use crate::record::{Ending, RequestRecord};
use crate::workload::PromptClass;

/// How many distinct failure messages a phase keeps for the report.
const ERROR_SAMPLES: usize = 5;

/// An HDR histogram of durations, recorded in microseconds. Auto-resizing: it grows to the
/// largest value recorded, so no value is out of range.
#[derive(Debug, Clone)]
pub struct LatencyHistogram(Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::with_precision(3)
    }
}

impl LatencyHistogram {
    fn with_precision(significant_figures: u8) -> Self {
        Self(Histogram::new(significant_figures).expect("1 to 5 significant figures is a valid precision"))
    }

    /// Coarser (2 significant figures, an eighth of the memory) for the many per-second
    /// histograms.
    pub fn coarse() -> Self {
        Self::with_precision(2)
    }

    pub fn record(&mut self, value: Duration) {
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        // Only a value beyond what a histogram can ever hold fails; clamp that one.
        if self.0.record(micros).is_err() {
            self.0.saturating_record(micros);
        }
    }

    pub fn percentiles(&self) -> Percentiles {
        if self.0.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: self.0.len(),
            min_ms: ms(self.0.min()),
            mean_ms: self.0.mean() / 1000.0,
            p50_ms: ms(self.0.value_at_quantile(0.50)),
            p90_ms: ms(self.0.value_at_quantile(0.90)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            p999_ms: ms(self.0.value_at_quantile(0.999)),
            max_ms: ms(self.0.max()),
        }
    }
}

/// A histogram's summary in milliseconds; all zero when nothing was recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// What one phase sent and got back, as seen by the client.
#[derive(Debug, Default)]
pub struct PhaseStats {
    pub sent: u64,
    pub accepted: u64,
    pub ended: u64,
    /// Requests by client-side outcome ([`Ending::label`]).
    pub outcomes: BTreeMap<String, u64>,
    /// Intended send time → terminal outcome received, for requests that got one.
    pub e2e: LatencyHistogram,
    /// Intended send time → first non-empty token.
    pub ttft: LatencyHistogram,
    /// Intended send time → actually sent: how far the harness itself fell behind its schedule.
    pub send_lag: LatencyHistogram,
    pub e2e_by_prompt: BTreeMap<PromptClass, LatencyHistogram>,
    /// A few distinct failure messages, to tell what went wrong.
    pub error_samples: Vec<String>,
}

impl PhaseStats {
    pub fn in_flight(&self) -> u64 {
        self.sent - self.ended
    }

    /// Requests that did not end COMPLETED.
    pub fn errors(&self) -> u64 {
        self.ended - self.outcomes.get(TerminalStatus::Completed.name()).copied().unwrap_or(0)
    }

    pub fn record_end(&mut self, record: &RequestRecord) {
        self.ended += 1;
        *self.outcomes.entry(record.ending.label()).or_default() += 1;
        self.send_lag.record(record.sent_lag);
        if let Some(ttft) = record.ttft() {
            self.ttft.record(ttft);
        }
        if let Some(e2e) = record.e2e() {
            self.e2e.record(e2e);
            self.e2e_by_prompt.entry(record.class).or_default().record(e2e);
        }
        if let Ending::Failed { error } | Ending::Rejected { code: error } = &record.ending
            && self.error_samples.len() < ERROR_SAMPLES
            && !self.error_samples.contains(error)
        {
            self.error_samples.push(error.clone());
        }
    }
}

/// Counts and latencies per second of the run (all phases on one clock). Sends count in the
/// second they were scheduled, accepts when they arrived, completions and errors in the second
/// the request ended; a second's latency percentiles are those of the requests that completed
/// in it.
#[derive(Debug, Default)]
pub struct Timeline {
    seconds: Vec<Second>,
}

#[derive(Debug)]
struct Second {
    sent: u64,
    accepted: u64,
    completed: u64,
    errors: u64,
    e2e: LatencyHistogram,
}

impl Default for Second {
    fn default() -> Self {
        Self { sent: 0, accepted: 0, completed: 0, errors: 0, e2e: LatencyHistogram::coarse() }
    }
}

/// One second of the timeline, as reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// Seconds since the run started (this point covers `[second, second + 1)`).
    pub second: u64,
    pub sent: u64,
    pub accepted: u64,
    /// Requests that COMPLETED in this second: the throughput.
    pub completed: u64,
    /// Requests that ended otherwise in this second (another terminal status, refused,
    /// failed, timed out).
    pub errors: u64,
    pub e2e_p50_ms: f64,
    pub e2e_p90_ms: f64,
    pub e2e_p99_ms: f64,
}

impl Timeline {
    fn second(&mut self, at: Duration) -> &mut Second {
        let index = at.as_secs() as usize;
        if self.seconds.len() <= index {
            self.seconds.resize_with(index + 1, Second::default);
        }
        &mut self.seconds[index]
    }

    pub fn sent(&mut self, at: Duration) {
        self.second(at).sent += 1;
    }

    pub fn accepted(&mut self, at: Duration) {
        self.second(at).accepted += 1;
    }

    /// A request ended at `at`: COMPLETED with latency `e2e`, or (`None`) otherwise.
    pub fn ended(&mut self, at: Duration, e2e: Option<Duration>) {
        let second = self.second(at);
        match e2e {
            Some(e2e) => {
                second.completed += 1;
                second.e2e.record(e2e);
            }
            None => second.errors += 1,
        }
    }

    pub fn points(&self) -> Vec<TimelinePoint> {
        self.seconds.iter().enumerate().map(|(i, s)| s.point(i as u64)).collect()
    }
}

impl Second {
    fn point(&self, second: u64) -> TimelinePoint {
        let p = self.e2e.percentiles();
        TimelinePoint {
            second,
            sent: self.sent,
            accepted: self.accepted,
            completed: self.completed,
            errors: self.errors,
            e2e_p50_ms: p.p50_ms,
            e2e_p90_ms: p.p90_ms,
            e2e_p99_ms: p.p99_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{completed, record};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_come_out_in_milliseconds_within_hdr_precision() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.percentiles(), Percentiles::default());
        for v in 1..=1000 {
            h.record(ms(v));
        }
        let p = h.percentiles();
        assert_eq!(p.count, 1000);
        assert_eq!(p.min_ms, 1.0);
        for (got, want) in
            [(p.p50_ms, 500.0), (p.p90_ms, 900.0), (p.p99_ms, 990.0), (p.max_ms, 1000.0), (p.mean_ms, 500.5)]
        {
            assert!((got - want).abs() / want < 0.001, "{got} vs {want}");
        }
    }

    #[test]
    fn phase_stats_tally_outcomes_latencies_and_distinct_error_samples() {
        let mut stats = PhaseStats { sent: 5, accepted: 3, ..Default::default() };
        stats.record_end(&completed(ms(100)));
        stats.record_end(&completed(ms(300)));
        stats.record_end(&record(Ending::Failed { error: "reset".into() }));
        stats.record_end(&record(Ending::Failed { error: "reset".into() }));
        assert_eq!((stats.ended, stats.in_flight(), stats.errors()), (4, 1, 2));
        assert_eq!(stats.outcomes, BTreeMap::from([("COMPLETED".into(), 2), ("failed".into(), 2)]));
        assert_eq!(stats.e2e.percentiles().count, 2);
        assert_eq!(stats.ttft.percentiles().count, 2, "failed requests are not timed, first token or not");
        assert_eq!(stats.e2e_by_prompt[&PromptClass::Short].percentiles().count, 2);
        assert_eq!(stats.error_samples, vec!["reset".to_string()]);
    }

    #[test]
    fn the_timeline_buckets_by_second_and_summarises_each() {
        let mut t = Timeline::default();
        t.sent(ms(100));
        t.sent(ms(900));
        t.accepted(ms(1_100));
        t.ended(ms(1_200), Some(ms(40)));
        t.ended(ms(1_800), Some(ms(60)));
        t.ended(ms(1_900), None);
        t.ended(ms(3_500), None);
        let points = t.points();
        assert_eq!(points.len(), 4);
        assert_eq!((points[0].sent, points[0].completed), (2, 0));
        let second = &points[1];
        assert_eq!((second.accepted, second.completed, second.errors), (1, 2, 1));
        // Per-second histograms hold 2 significant figures.
        assert!((second.e2e_p50_ms - 40.0).abs() < 0.5 && (second.e2e_p99_ms - 60.0).abs() < 0.5, "{second:?}");
        assert_eq!((points[2].completed, points[2].e2e_p99_ms), (0, 0.0));
        assert_eq!((points[3].completed, points[3].errors), (0, 1));
    }
}
