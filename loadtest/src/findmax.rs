//! `find-max`: offered rate stepped up geometrically until the mesh stops keeping up, then
//! bisected (geometrically) between the last rate it sustained and the first it did not.
use std::time::Duration;

use serde::Serialize;

use crate::phase::PhaseOutcome;
use crate::record::Ending;

/// When a step counts as sustained.
#[derive(Debug, Clone, Serialize)]
pub struct Criteria {
    /// Achieved completion rate / offered rate must reach this.
    pub min_throughput_ratio: f64,
    /// Share of requests that may end other than COMPLETED (rejects, errors, timeouts).
    pub max_error_ratio: f64,
    /// Absolute bound on the step's p99 end-to-end latency.
    pub max_p99_ms: Option<f64>,
    /// Bound on the step's p99 as a multiple of the first step's p99.
    pub max_p99_growth: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepVerdict {
    pub sustained: bool,
    /// COMPLETED requests per second while the step was in steady state (see [`judge`]).
    pub achieved_rps: f64,
    /// Those completions over the requests sent in the matching stretch of the schedule.
    pub throughput_ratio: f64,
    pub error_ratio: f64,
    pub p99_ms: f64,
    /// Why the step was not sustained; empty when it was.
    pub reasons: Vec<String>,
}

/// Judges a step. Throughput is taken in steady state, from the step's median latency `m` to
/// the end of its schedule `D`: the COMPLETED requests that ended in `[m, D]`, against the
/// requests sent in `[0, D − m]` (those a mesh that keeps up ends in that window). So latency
/// itself does not count against a step, only a backlog that grows; and the actual sends, not
/// the nominal rate, are the reference, so Poisson's chance dips do not either.
/// `baseline_p99_ms` is the first step's p99.
pub fn judge(step: &PhaseOutcome, criteria: &Criteria, baseline_p99_ms: Option<f64>) -> StepVerdict {
    let schedule = step.plan.duration;
    let e2e = step.stats.e2e.percentiles();
    let median = Duration::from_secs_f64(e2e.p50_ms / 1000.0);
    let mut reasons = Vec::new();

    let (achieved_rps, throughput_ratio) = if median * 2 < schedule {
        let completed = step
            .records
            .iter()
            .filter(|r| r.ending.is_completed() && r.ended_at >= median && r.ended_at <= schedule)
            .count();
        let sent = step.records.iter().filter(|r| r.intended <= schedule - median).count();
        let throughput_ratio = completed as f64 / sent.max(1) as f64;
        if throughput_ratio < criteria.min_throughput_ratio {
            reasons.push(format!(
                "completed {:.0}% of what was offered (< {:.0}%)",
                throughput_ratio * 100.0,
                criteria.min_throughput_ratio * 100.0
            ));
        }
        (completed as f64 / (schedule - median).as_secs_f64(), throughput_ratio)
    } else {
        // No steady state to measure within the step.
        reasons.push(format!("median latency {:.0} ms is over half the step", e2e.p50_ms));
        (0.0, 0.0)
    };
    let sent = step.stats.sent.max(1) as f64;
    let errors = step.records.iter().filter(|r| !r.ending.is_completed()).count() as f64;
    let error_ratio = errors / sent;
    if error_ratio > criteria.max_error_ratio {
        let timed_out = step.records.iter().filter(|r| r.ending == Ending::TimedOut).count();
        reasons.push(format!("{:.1}% not completed ({timed_out} timed out)", error_ratio * 100.0));
    }
    if let Some(bound) = criteria.max_p99_ms
        && e2e.p99_ms > bound
    {
        reasons.push(format!("p99 {:.0} ms > {bound:.0} ms", e2e.p99_ms));
    }
    if let Some(baseline) = baseline_p99_ms
        && e2e.p99_ms > baseline * criteria.max_p99_growth
    {
        reasons
            .push(format!("p99 {:.0} ms > {}× the first step's {baseline:.0} ms", e2e.p99_ms, criteria.max_p99_growth));
    }
    StepVerdict {
        sustained: reasons.is_empty(),
        achieved_rps,
        throughput_ratio,
        error_ratio,
        p99_ms: e2e.p99_ms,
        reasons,
    }
}

/// The sequence of offered rates: ×`factor` while steps are sustained (capped at `max_rate`),
/// then `refine` geometric bisections between the best sustained and the lowest failed rate.
#[derive(Debug, Clone)]
pub struct RateSearch {
    factor: f64,
    max_rate: f64,
    refinements_left: u32,
    best_sustained: Option<f64>,
    lowest_failed: Option<f64>,
    next: Option<f64>,
}

impl RateSearch {
    pub fn new(start_rate: f64, factor: f64, max_rate: f64, refine: u32) -> Self {
        Self {
            factor,
            max_rate,
            refinements_left: refine,
            best_sustained: None,
            lowest_failed: None,
            next: Some(start_rate.min(max_rate)),
        }
    }

    /// The rate of the next step, or `None` when the search is over.
    pub fn next_rate(&self) -> Option<f64> {
        self.next
    }

    /// Whether the search has seen a failure, i.e. further steps refine.
    pub fn refining(&self) -> bool {
        self.lowest_failed.is_some()
    }

    pub fn max_sustained(&self) -> Option<f64> {
        self.best_sustained
    }

    pub fn record(&mut self, rate: f64, sustained: bool) {
        if sustained {
            self.best_sustained = Some(self.best_sustained.map_or(rate, |b| b.max(rate)));
        } else {
            self.lowest_failed = Some(self.lowest_failed.map_or(rate, |f| f.min(rate)));
        }
        self.next = match (self.best_sustained, self.lowest_failed) {
            // Still climbing: one more step up, the last one exactly at the cap.
            (Some(best), None) if best < self.max_rate => Some((best * self.factor).min(self.max_rate)),
            (Some(_), None) => None,
            (Some(best), Some(failed)) if self.refinements_left > 0 => {
                self.refinements_left -= 1;
                Some((best * failed).sqrt())
            }
            // Refined as far as asked, or not even the first rate held.
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phase::PhasePlan;
    use crate::record::RequestRecord;
    use crate::record::tests::{completed, record};
    use crate::stats::PhaseStats;

    fn criteria() -> Criteria {
        Criteria { min_throughput_ratio: 0.95, max_error_ratio: 0.01, max_p99_ms: None, max_p99_growth: 5.0 }
    }

    /// A 10 s step at 10/s whose requests are sent on schedule and take `latency(i)`.
    fn step(latency: impl Fn(u64) -> Option<Duration>) -> PhaseOutcome {
        let plan = PhasePlan {
            label: "step".into(),
            rate: 10.0,
            duration: Duration::from_secs(10),
            process: crate::arrivals::ArrivalProcess::Constant,
            seed: 0,
            drain_timeout: Duration::from_secs(5),
        };
        let mut stats = PhaseStats::default();
        let records: Vec<RequestRecord> = (0..100)
            .map(|i| {
                let intended = Duration::from_millis(i * 100);
                let mut r = match latency(i) {
                    Some(l) => completed(intended + l),
                    None => record(Ending::TimedOut),
                };
                r.intended = intended;
                stats.sent += 1;
                stats.record_end(&r);
                r
            })
            .collect();
        PhaseOutcome { plan, started_at: Duration::ZERO, elapsed: Duration::from_secs(11), stats, records }
    }

    #[test]
    fn a_mesh_that_keeps_up_is_sustained_whatever_its_constant_latency() {
        for latency_ms in [5, 800, 3_000] {
            let verdict = judge(&step(|_| Some(Duration::from_millis(latency_ms))), &criteria(), None);
            assert!(verdict.sustained, "{latency_ms} ms: {verdict:?}");
            assert!((verdict.achieved_rps - 10.0).abs() < 0.5, "{latency_ms} ms: {verdict:?}");
            assert!(verdict.throughput_ratio > 0.98, "{latency_ms} ms: {verdict:?}");
        }
    }

    #[test]
    fn a_median_latency_over_half_the_step_leaves_nothing_to_measure() {
        let verdict = judge(&step(|_| Some(Duration::from_secs(6))), &criteria(), None);
        assert!(!verdict.sustained);
        assert_eq!(verdict.reasons.len(), 1, "{verdict:?}");
        assert!(verdict.reasons[0].ends_with("ms is over half the step"), "{verdict:?}");
    }

    #[test]
    fn a_growing_backlog_fails_on_throughput() {
        // Capacity 8/s: request i ends at i × 125 ms, so its latency grows by 25 ms per request.
        let verdict = judge(&step(|i| Some(Duration::from_millis(i * 25 + 50))), &criteria(), None);
        assert!(!verdict.sustained);
        assert!((verdict.achieved_rps - 8.0).abs() < 0.5, "{verdict:?}");
        assert!((verdict.throughput_ratio - 0.8).abs() < 0.02, "{verdict:?}");
        assert!(verdict.reasons.iter().any(|r| r.contains("of what was offered")), "{verdict:?}");
    }

    #[test]
    fn timeouts_and_p99_growth_fail_a_step() {
        let verdict = judge(&step(|i| (i % 10 != 0).then(|| Duration::from_millis(20))), &criteria(), None);
        assert!(!verdict.sustained);
        assert!((verdict.error_ratio - 0.1).abs() < 1e-9);
        assert!(verdict.reasons.iter().any(|r| r.contains("10 timed out")), "{verdict:?}");

        let slow_tail = step(|i| Some(Duration::from_millis(if i % 20 == 0 { 400 } else { 20 })));
        let verdict = judge(&slow_tail, &criteria(), Some(30.0));
        assert!(!verdict.sustained && verdict.reasons.iter().any(|r| r.contains("first step")), "{verdict:?}");
        let verdict = judge(&slow_tail, &Criteria { max_p99_ms: Some(100.0), ..criteria() }, None);
        assert!(!verdict.sustained && verdict.reasons.iter().any(|r| r.contains("> 100 ms")), "{verdict:?}");
        assert!(judge(&slow_tail, &criteria(), Some(100.0)).sustained);
    }

    #[test]
    fn the_search_climbs_then_bisects() {
        let mut search = RateSearch::new(10.0, 2.0, 1_000.0, 2);
        let mut tried = Vec::new();
        // The mesh holds up to 50/s.
        while let Some(rate) = search.next_rate() {
            tried.push(rate);
            search.record(rate, rate <= 50.0);
        }
        let sqrt = |x: f64| x.sqrt();
        assert_eq!(tried[..4], [10.0, 20.0, 40.0, 80.0]);
        assert!((tried[4] - sqrt(40.0 * 80.0)).abs() < 1e-9, "{tried:?}");
        assert!((tried[5] - sqrt(40.0 * tried[4])).abs() < 1e-9, "{tried:?}");
        assert_eq!(tried.len(), 6);
        assert_eq!(search.max_sustained(), Some(tried[5]));
        assert!(search.refining());
    }

    #[test]
    fn the_search_stops_at_the_cap_or_when_the_first_rate_fails() {
        let mut search = RateSearch::new(10.0, 3.0, 50.0, 2);
        let mut tried = Vec::new();
        while let Some(rate) = search.next_rate() {
            tried.push(rate);
            search.record(rate, true);
        }
        assert_eq!(tried, [10.0, 30.0, 50.0]);
        assert_eq!(search.max_sustained(), Some(50.0));

        let mut search = RateSearch::new(10.0, 2.0, 100.0, 2);
        search.record(10.0, false);
        assert_eq!((search.next_rate(), search.max_sustained()), (None, None));
    }
}
