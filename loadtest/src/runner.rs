//! A whole run: its phases (one for `run`; steps, refinements and fractions for `find-max`),
//! settling between phases, the ledger check, and the report.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;

use crate::cli::{Command, CommonArgs, FindMaxArgs};
use crate::client::{ClientError, Endpoints};
use crate::findmax::{Criteria, RateSearch, StepVerdict, judge};
use crate::ledger;
use crate::phase::{PhaseOutcome, PhasePlan, RunState, run_phase};
use millrace_proto::v1::TerminalStatus;

use crate::record::Ending;
use crate::report::{FindMaxReport, PhaseReport, PhaseRole, Report, Settings};
use crate::sink::{SinkClient, SinkError, SinkRow};
use crate::stages::StageBreakdown;
use crate::stats::Timeline;
use crate::workload::{Asks, Workload};

/// Status counted for an accepted request that has no sink row.
const NO_ROW: &str = "NO_ROW";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach ingest: {0}")]
    Client(#[from] ClientError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// A finished run: its report and where to write it.
pub struct Finished {
    pub report: Report,
    pub out_dir: PathBuf,
}

pub async fn execute(command: Command) -> Result<Finished, RunError> {
    match command {
        Command::Run(args) => {
            let mut runner = Runner::new(&args.common)?;
            let duration = Duration::from_secs_f64(args.duration_s);
            runner.phase("run".into(), args.rate, duration, PhaseRole::Run).await?;
            runner.finish(None).await
        }
        Command::FindMax(args) => {
            let mut runner = Runner::new(&args.common)?;
            let find_max = runner.find_max(&args).await?;
            runner.finish(Some(find_max)).await
        }
    }
}

struct Runner {
    run_id: String,
    started_unix_ms: i64,
    settings: Settings,
    out_dir: PathBuf,
    state: RunState,
    sink: SinkClient,
    drain_timeout: Duration,
    ledger_timeout: Duration,
    phases: Vec<PhaseDone>,
}

struct PhaseDone {
    outcome: PhaseOutcome,
    role: PhaseRole,
    verdict: Option<StepVerdict>,
}

impl Runner {
    fn new(args: &CommonArgs) -> Result<Self, RunError> {
        let run_id = new_run_id();
        let asks = Asks {
            model: args.model.clone(),
            max_new_tokens: args.max_new_tokens,
            ignore_eos: args.ignore_eos,
            deadline_ms: args.deadline_ms,
        };
        let workload = Workload::new(&run_id, args.users as usize, args.turns, args.prompt_mix.clone(), asks);
        let users = workload.users().to_vec();
        eprintln!("run {run_id}: users {} … {}", users[0], users[users.len() - 1]);
        let settings = Settings {
            api: args.api,
            ingest_url: args.ingest_url.clone(),
            grpc_url: args.grpc_url.clone(),
            sink_url: args.sink_url.clone(),
            model: args.model.clone(),
            max_new_tokens: args.max_new_tokens,
            ignore_eos: args.ignore_eos,
            turns: args.turns,
            deadline_ms: args.deadline_ms,
            users,
            prompt_mix: args.prompt_mix.to_string(),
            connections: args.sockets,
            arrivals: args.arrivals,
            seed: args.seed,
            drain_timeout_s: args.drain_timeout_s,
            ledger_timeout_s: args.ledger_timeout_s,
        };
        let endpoints = Endpoints {
            api: args.api,
            ingest_url: args.ingest_url.clone(),
            grpc_url: args.grpc_url.clone(),
            api_key: args.api_key.clone(),
            connections: args.sockets as usize,
        };
        Ok(Self {
            out_dir: args.out.clone().unwrap_or_else(|| PathBuf::from("target/loadtest").join(&run_id)),
            started_unix_ms: unix_ms(),
            run_id,
            settings,
            state: RunState { endpoints, workload, timeline: Timeline::default(), started: Instant::now() },
            sink: SinkClient::new(&args.sink_url)?,
            drain_timeout: args.drain_timeout(),
            ledger_timeout: args.ledger_timeout(),
            phases: Vec::new(),
        })
    }

    /// Runs one phase, then waits for the requests it gave up on to end in the mesh, so the
    /// next phase measures an idle mesh. Returns the phase's index.
    async fn phase(
        &mut self,
        label: String,
        rate: f64,
        duration: Duration,
        role: PhaseRole,
    ) -> Result<usize, RunError> {
        eprintln!("phase {label}: {rate:.1} req/s for {:.0} s", duration.as_secs_f64());
        let plan = PhasePlan {
            label,
            rate,
            duration,
            process: self.settings.arrivals,
            seed: self.settings.seed.wrapping_add(self.phases.len() as u64),
            drain_timeout: self.drain_timeout,
        };
        let outcome = run_phase(plan, &mut self.state).await?;
        let unsettled: Vec<String> = outcome
            .records
            .iter()
            .filter(|r| !matches!(r.ending, Ending::Terminal { .. }))
            .filter_map(|r| r.request_id.clone())
            .collect();
        if !unsettled.is_empty() {
            let deadline = tokio::time::Instant::now() + self.ledger_timeout;
            let left = ledger::settle(&self.sink, unsettled, deadline).await;
            if !left.request_ids.is_empty() {
                let why = left.sink_error.map(|e| format!(" ({e})")).unwrap_or_default();
                eprintln!("{} requests given up on still have no terminal row{why}; going on", left.request_ids.len());
            }
        }
        self.phases.push(PhaseDone { outcome, role, verdict: None });
        Ok(self.phases.len() - 1)
    }

    async fn find_max(&mut self, args: &FindMaxArgs) -> Result<FindMaxReport, RunError> {
        let criteria = Criteria {
            min_throughput_ratio: args.min_throughput_ratio,
            max_error_ratio: args.max_error_ratio,
            max_p99_ms: args.max_p99_ms,
            max_p99_growth: args.max_p99_growth,
        };
        let step_duration = Duration::from_secs_f64(args.step_duration_s);
        let mut search = RateSearch::new(args.start_rate, args.step_factor, args.max_rate, args.refine);
        let mut baseline_p99_ms = None;
        while let Some(rate) = search.next_rate() {
            let role = if search.refining() { PhaseRole::Refine } else { PhaseRole::Step };
            let label = format!("step {} @ {rate:.1}/s", self.phases.len() + 1);
            let index = self.phase(label, rate, step_duration, role).await?;
            let verdict = judge(&self.phases[index].outcome, &criteria, baseline_p99_ms);
            baseline_p99_ms = baseline_p99_ms.or(Some(verdict.p99_ms).filter(|p| *p > 0.0));
            match verdict.sustained {
                true => eprintln!(
                    "  sustained: {:.1}/s completed ({:.0}% of offered), p99 {:.0} ms",
                    verdict.achieved_rps,
                    verdict.throughput_ratio * 100.0,
                    verdict.p99_ms
                ),
                false => eprintln!("  not sustained: {}", verdict.reasons.join("; ")),
            }
            search.record(rate, verdict.sustained);
            self.phases[index].verdict = Some(verdict);
        }
        let max_sustained_rps = search.max_sustained();
        match max_sustained_rps {
            Some(max) => {
                eprintln!("maximum sustained rate: {max:.1} req/s");
                for &fraction in &args.fractions {
                    let rate = max * fraction;
                    let label = format!("{:.0}% @ {rate:.1}/s", fraction * 100.0);
                    let duration = Duration::from_secs_f64(args.fraction_duration_s);
                    self.phase(label, rate, duration, PhaseRole::Fraction(fraction)).await?;
                }
            }
            None => eprintln!("not even {:.1} req/s was sustained; no fraction runs", args.start_rate),
        }
        Ok(FindMaxReport {
            criteria,
            start_rps: args.start_rate,
            step_factor: args.step_factor,
            step_duration_s: args.step_duration_s,
            max_sustained_rps,
        })
    }

    /// The ledger check over every phase, then the report.
    async fn finish(self, find_max: Option<FindMaxReport>) -> Result<Finished, RunError> {
        let accepted: HashSet<String> =
            self.phases.iter().flat_map(|p| &p.outcome.records).filter_map(|r| r.request_id.clone()).collect();
        eprintln!("ledger: waiting for {} rows in the sink", accepted.len());
        let deadline = tokio::time::Instant::now() + self.ledger_timeout;
        let (ledger, rows) = ledger::check(&self.sink, &self.settings.users, &accepted, deadline).await;
        let mut rows_by_id: HashMap<&str, &SinkRow> = HashMap::new();
        for row in &rows {
            rows_by_id.entry(row.request_id.as_str()).or_insert(row);
        }
        let phases = self.phases.iter().map(|p| phase_report(p, &rows_by_id)).collect();
        Ok(Finished {
            report: Report {
                run_id: self.run_id,
                started_unix_ms: self.started_unix_ms,
                settings: self.settings,
                phases,
                find_max,
                ledger,
                timeline: self.state.timeline.points(),
            },
            out_dir: self.out_dir,
        })
    }
}

/// A phase's numbers, with the sink's statuses and stage timings of its accepted requests.
fn phase_report(done: &PhaseDone, rows_by_id: &HashMap<&str, &SinkRow>) -> PhaseReport {
    let outcome = &done.outcome;
    let stats = &outcome.stats;
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut stages = StageBreakdown::default();
    for request_id in outcome.records.iter().filter_map(|r| r.request_id.as_deref()) {
        match rows_by_id.get(request_id) {
            Some(row) => {
                *statuses.entry(row.status.name().to_owned()).or_default() += 1;
                stages.add(row);
            }
            None => *statuses.entry(NO_ROW.to_owned()).or_default() += 1,
        }
    }
    let completed = stats.outcomes.get(TerminalStatus::Completed.name()).copied().unwrap_or(0);
    let elapsed_s = outcome.elapsed.as_secs_f64();
    // Over the whole schedule at least: a phase whose last send came just before its end
    // would otherwise seem to complete more than was offered.
    let throughput_window_s = elapsed_s.max(outcome.plan.duration.as_secs_f64());
    PhaseReport {
        label: outcome.plan.label.clone(),
        role: done.role,
        offered_rps: outcome.plan.rate,
        duration_s: outcome.plan.duration.as_secs_f64(),
        started_at_s: outcome.started_at.as_secs_f64(),
        elapsed_s,
        sent: stats.sent,
        accepted: stats.accepted,
        throughput_rps: completed as f64 / throughput_window_s,
        outcomes: stats.outcomes.clone(),
        statuses,
        e2e: stats.e2e.percentiles(),
        ttft: stats.ttft.percentiles(),
        send_lag: stats.send_lag.percentiles(),
        e2e_by_prompt: stats
            .e2e_by_prompt
            .iter()
            .map(|(class, h)| (class.name().to_owned(), h.percentiles()))
            .collect(),
        stages: stages.segments(),
        error_samples: stats.error_samples.clone(),
        verdict: done.verdict.clone(),
    }
}

/// A short id that differs between runs: the low bits of the time, then random bits (the
/// workload seed is deliberately not used, so two runs with one seed still get distinct users).
fn new_run_id() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    format!("{:06x}{:04x}", secs & 0xff_ffff, rand::rng().random::<u16>())
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}
