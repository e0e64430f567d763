//! One phase of load: open-loop sends at a fixed offered rate for a duration, each request in
//! its own task at its scheduled instant, then a drain until every request has ended or the
//! drain timeout runs out.
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::time::{MissedTickBehavior, interval_at, sleep_until, timeout_at};

use crate::arrivals::{ArrivalProcess, Arrivals};
use crate::client::{Client, ClientError, Endpoints, Trace};
use crate::record::{Ending, Event, RequestRecord};
use crate::stats::{LatencyHistogram, Percentiles, PhaseStats, Timeline};
use crate::workload::{Query, Workload};

/// Mixed into the phase seed for the workload's rng, so the arrival times do not depend on
/// how many draws the prompt mix makes.
const WORKLOAD_STREAM: u64 = 0x9e37_79b9_7f4a_7c15;
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct PhasePlan {
    /// Names the phase in the progress line and the report.
    pub label: String,
    pub rate: f64,
    pub duration: Duration,
    pub process: ArrivalProcess,
    pub seed: u64,
    /// How long after the last scheduled send open requests are waited for.
    pub drain_timeout: Duration,
}

/// A finished phase.
#[derive(Debug)]
pub struct PhaseOutcome {
    pub plan: PhasePlan,
    /// When the phase started, on the run clock.
    pub started_at: Duration,
    /// From the first scheduled send until the last request ended.
    pub elapsed: Duration,
    pub stats: PhaseStats,
    pub records: Vec<RequestRecord>,
}

/// The run-wide state a phase reads and adds to.
pub struct RunState {
    pub endpoints: Endpoints,
    pub workload: Workload,
    pub timeline: Timeline,
    /// Origin of the run clock (the timeline's seconds).
    pub started: Instant,
}

pub async fn run_phase(plan: PhasePlan, run: &mut RunState) -> Result<PhaseOutcome, ClientError> {
    let client = Arc::new(Client::connect(&run.endpoints).await?);
    let start = Instant::now();
    let started_at = start - run.started;
    let give_up_at = start + plan.duration + plan.drain_timeout;
    let mut arrivals = Arrivals::new(plan.process, plan.rate, plan.duration, plan.seed);
    let mut rng = StdRng::seed_from_u64(plan.seed ^ WORKLOAD_STREAM);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut next = arrivals.next();
    // The loop's own sender goes once the schedule is done, so the channel closes exactly when
    // the last request task has ended.
    let mut sender = next.is_some().then_some(events_tx);
    let mut ticker = interval_at((start + PROGRESS_EVERY).into(), PROGRESS_EVERY);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut stats = PhaseStats::default();
    let mut records = Vec::new();
    // e2e of the requests that completed since the last progress line.
    let mut recent = LatencyHistogram::coarse();

    loop {
        tokio::select! {
            // Sends first: the schedule must not wait behind bookkeeping.
            biased;
            _ = sleep_until((start + next.unwrap_or_default()).into()), if next.is_some() => {
                let intended = next.take().expect("guarded by the branch condition");
                let query = run.workload.next_query(&mut rng);
                stats.sent += 1;
                run.timeline.sent(started_at + intended);
                let events = sender.clone().expect("present while the schedule lasts");
                tokio::spawn(run_request(client.clone(), query, start, intended, give_up_at, events));
                next = arrivals.next();
                if next.is_none() {
                    sender = None;
                }
            }
            event = events.recv() => match event {
                Some(Event::Accepted { at }) => {
                    stats.accepted += 1;
                    run.timeline.accepted(started_at + at);
                }
                Some(Event::Ended(record)) => {
                    stats.record_end(&record);
                    if let Some(e2e) = record.e2e() {
                        recent.record(e2e);
                    }
                    run.timeline.ended(started_at + record.ended_at, record.e2e());
                    records.push(*record);
                }
                None => break,
            },
            _ = ticker.tick() => {
                eprintln!("{}", progress_line(&plan.label, start.elapsed(), &stats, &recent.percentiles()));
                recent = LatencyHistogram::coarse();
            }
        }
    }
    let elapsed = start.elapsed();
    client.close().await;
    records.sort_by_key(|r| r.seq);
    Ok(PhaseOutcome { plan, started_at, elapsed, stats, records })
}

async fn run_request(
    client: Arc<Client>,
    query: Query,
    start: Instant,
    intended: Duration,
    give_up_at: Instant,
    events: UnboundedSender<Event>,
) {
    let sent_lag = start.elapsed().saturating_sub(intended);
    let mut trace = Trace::new(start, events.clone());
    let ending = match timeout_at(give_up_at.into(), client.execute(&query, &mut trace)).await {
        Ok(Ok(ending)) => ending,
        Ok(Err(error)) => Ending::Failed { error: error.to_string() },
        Err(_) => Ending::TimedOut,
    };
    let ended_at = match &ending {
        Ending::Terminal { at, .. } => *at,
        _ => trace.now(),
    };
    let record = RequestRecord {
        seq: query.seq,
        class: query.class,
        intended,
        sent_lag,
        request_id: trace.request_id,
        first_token_at: trace.first_token_at,
        ended_at,
        ending,
    };
    let _ = events.send(Event::Ended(Box::new(record)));
}

/// `recent`: e2e of the requests that ended in the last second.
fn progress_line(label: &str, elapsed: Duration, stats: &PhaseStats, recent: &Percentiles) -> String {
    let latency = match recent.count {
        0 => "p50 -  p99 -".to_owned(),
        _ => format!("p50 {:.1} ms  p99 {:.1} ms", recent.p50_ms, recent.p99_ms),
    };
    format!(
        "[{label}] {:>4}s  sent {}  accepted {}  finished {}  in flight {}  e2e {latency}  errors {}",
        elapsed.as_secs(),
        stats.sent,
        stats.accepted,
        stats.ended,
        stats.in_flight(),
        stats.errors(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{completed, record};

    #[test]
    fn the_progress_line_shows_counts_and_the_last_seconds_percentiles() {
        let mut stats = PhaseStats { sent: 10, accepted: 9, ..Default::default() };
        stats.record_end(&completed(Duration::from_millis(20)));
        stats.record_end(&record(Ending::TimedOut));
        let mut recent = LatencyHistogram::default();
        recent.record(Duration::from_micros(12_340));
        recent.record(Duration::from_millis(45));
        let line = progress_line("rate 10/s", Duration::from_millis(4_200), &stats, &recent.percentiles());
        assert_eq!(
            line,
            "[rate 10/s]    4s  sent 10  accepted 9  finished 2  in flight 8  e2e p50 12.3 ms  p99 45.0 ms  errors 1"
        );
        let nothing_ended = Percentiles::default();
        assert!(progress_line("x", Duration::ZERO, &stats, &nothing_ended).contains("e2e p50 -  p99 -"));
    }
}
