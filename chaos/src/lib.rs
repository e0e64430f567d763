//! Millrace's chaos suite (issue 13): NATS and the seven services as separate processes on
//! file-backed streams, open-loop load through ingest with a client that retries with the same
//! `Idempotency-Key`, faults injected one after another with recovery gaps, then the ledger
//! and duplicate-effect checks and a JSON + Markdown report. `chaos/README.md` says how to run
//! it and read the report.
//!
//! - [`config`]: flags and the schedules; [`mesh`]: the processes; [`load`]: the client;
//! - [`faults`]: injecting each fault and timing the recovery;
//! - [`audit`]: counting what the interest-retention streams stored, per request id;
//! - [`db`]: the sink's SQLite file; [`checks`]: the invariants; [`report`]: the report.
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use millrace_proto::now_unix_ms;

pub mod audit;
pub mod checks;
pub mod cluster;
pub mod config;
pub mod db;
pub mod faults;
pub mod load;
pub mod mesh;
pub mod report;

use config::{Config, Plan};
use faults::Runner;
use mesh::{ChaosMesh, Paths};
use report::{Counters, Report, Totals};

/// The service binaries the suite starts.
pub const SERVICES: [&str; 7] = ["ingest", "preprocess", "moderation", "session", "batcher", "inference", "sink"];

/// Checks that everything real the run needs is there: nats-server (for the `cluster`
/// schedule a Docker engine and the NATS image instead), the seven service binaries, the
/// prepared model. `Err` says what is missing (the test skips or fails on it).
pub fn preflight(config: &Config) -> Result<Paths, String> {
    let nats_image = if config.schedule == config::Schedule::Cluster {
        cluster::docker_available()?;
        Some(cluster::nats_image()?)
    } else {
        millrace_testkit::nats_server_binary().map_err(|e| format!("{e:#}"))?;
        None
    };
    for name in SERVICES {
        match &config.bin_dir {
            Some(dir) if !dir.join(name).exists() => {
                return Err(format!("{} is not built (cargo build --workspace --bins)", dir.join(name).display()));
            }
            Some(_) => {}
            None => {
                millrace_testkit::service_binary(name).map_err(|e| format!("{e:#}"))?;
            }
        }
    }
    let models_dir = config.models_dir.clone().unwrap_or_else(millrace_testkit::models_dir);
    if !models_dir.join("manifest.json").exists() || !models_dir.join(&config.model).is_dir() {
        return Err(format!(
            "model {} is not prepared under {} (scripts/setup.sh runs scripts/prepare-models.sh --tiny)",
            config.model,
            models_dir.display()
        ));
    }
    Ok(Paths { bin_dir: config.bin_dir.clone(), models_dir, nats_image })
}

/// Runs the schedule and writes the report; `Err` only when the run could not be carried out
/// (a failed invariant is a report whose `passed` is false).
pub async fn run(config: Config) -> anyhow::Result<Report> {
    let plan = Plan::new(&config)?;
    let paths = preflight(&config).map_err(anyhow::Error::msg)?;
    let run_id = format!(
        "{}-{}",
        match plan.schedule {
            config::Schedule::Short => "short",
            config::Schedule::Full => "full",
            config::Schedule::Cluster => "cluster",
        },
        now_unix_ms()
    );
    let run_dir = match &config.out {
        Some(dir) => dir.clone(),
        None => millrace_testkit::workspace_root().join("target/chaos").join(&run_id),
    };
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    eprintln!("[chaos] run {run_id} in {} (seed {})", run_dir.display(), plan.seed);
    let started_ms = now_unix_ms();
    let mesh = ChaosMesh::start(&plan, &paths, &run_id, &run_dir).await?;
    eprintln!("[chaos] mesh ready in {:.1} s", (now_unix_ms() - started_ms) as f64 / 1000.0);
    let client = millrace_bus::connect(&mesh.nats.url(), "chaos", Duration::from_secs(5))
        .await
        .context("connecting to nats-server")?;
    let js = async_nats::jetstream::new(client);
    let audit = audit::Audit::start(&js).await?;
    let db = db::Db::open(&mesh.db_path()).await?;
    let load = load::Load::start(&plan, mesh.ingest_http().to_string());
    let mut runner = Runner::new(plan.clone(), mesh, db, js.clone(), load);

    // Warm-up: load flows end to end before the first fault.
    let load_started = now_unix_ms();
    let first = runner.first_completion_after(load_started, Duration::from_secs_f64(plan.recovery_timeout_s)).await;
    let warmup_first_completion_s = first.map(|at| (at - load_started) as f64 / 1000.0);
    eprintln!("[chaos] load flowing: first completion after {warmup_first_completion_s:?} s");
    tokio::time::sleep(Duration::from_secs_f64(plan.warmup_s)).await;
    if plan.rate_limited_burst > 0 {
        runner.load.burst(plan.rate_limited_burst).await;
    }

    let mut faults = Vec::new();
    for (i, fault) in plan.faults.iter().enumerate() {
        faults.push(runner.inject(fault).await);
        if i + 1 < plan.faults.len() {
            tokio::time::sleep(Duration::from_secs_f64(plan.gap_s)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(plan.tail_s)).await;
    eprintln!("[chaos] stopping the load; waiting for submits under way");
    let Runner { mesh, db, js, load, poison, mut outage, killed_metrics, .. } = runner;
    let shared = load.stop().await;
    let records = shared.records.lock().expect("records lock").clone();
    let resubmits = shared.resubmits.lock().expect("resubmits lock").clone();
    for fault in &mut faults {
        Runner::window_figures(&records, fault);
        if fault.name == "outage"
            && let Some(outage) = outage.as_mut()
        {
            outage.answers = Runner::outage_answers(&records, fault);
        }
    }

    // Drain: every accepted request's row, every poison's dead letter.
    let accepted: HashSet<String> = records.iter().filter_map(|r| r.request_id().map(str::to_owned)).collect();
    let drain_started = now_unix_ms();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(plan.drain_s);
    loop {
        let rows = db.results().await.unwrap_or_default();
        let missing = accepted.iter().filter(|id| !rows.contains_key(*id)).count();
        let dead = db.dead_letters().await.map(|d| d.len()).unwrap_or(0);
        if (missing == 0 && dead >= poison.len()) || tokio::time::Instant::now() > deadline {
            eprintln!(
                "[chaos] drained in {:.1} s: {missing} accepted requests without a row",
                (now_unix_ms() - drain_started) as f64 / 1000.0
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drain_s = (now_unix_ms() - drain_started) as f64 / 1000.0;

    // The checks.
    let readiness = mesh.readiness().await;
    let rows = db.results().await?;
    let completed_ms: Vec<i64> = rows.values().filter(|r| r.status == "COMPLETED").map(|r| r.stored_unix_ms).collect();
    for fault in &mut faults {
        Runner::stall_figures(&records, &completed_ms, fault);
    }
    let dead_letters = db.dead_letters().await?;
    let counts = audit.count(&js, Duration::from_secs(15)).await?;
    let conversations = checks::conversations(&js).await?;
    let mut accepted_all = accepted.clone();
    accepted_all.extend(resubmits.iter().flat_map(|r| r.answers.iter().filter_map(|a| a.request_id.clone())));
    let origin = |edge: millrace_bus::topology::Edge| counts.get(edge.stream).cloned().unwrap_or_default();
    let (queries, completions, results) =
        (origin(audit::SOURCES[0]), origin(audit::SOURCES[1]), origin(audit::SOURCES[2]));
    let mut checks = vec![
        checks::ledger(&records, &rows, &poison, &resubmits),
        checks::audit_complete(&counts),
        checks::stored_once("no_query_stored_twice", "query", &queries, &accepted_all),
        checks::stored_once("no_completion_stored_twice", "completion", &completions, &accepted_all),
        checks::stored_once("no_result_stored_twice", "result", &results, &accepted_all),
        checks::turns_once(&conversations),
        checks::conversations_agree(&conversations, &rows),
        checks::one_id_per_key(&records, &resubmits),
    ];
    if plan.faults.iter().any(|f| matches!(f, config::Fault::KillNats | config::Fault::KillLeader)) {
        checks.push(checks::resubmits_held(&resubmits, Some(&queries)));
    }
    checks.push(checks::all_ready(&readiness));
    checks.push(checks::no_panics(&mesh.logs().await));
    checks.push(checks::dead_letters(&dead_letters, &poison));

    let counters = Counters::collect(&mesh, &killed_metrics).await;
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for id in &accepted {
        if let Some(row) = rows.get(id) {
            *by_status.entry(row.status.clone()).or_default() += 1;
        }
    }
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for a in records.iter().flat_map(|r| &r.answers) {
        *answers
            .entry(if a.http == 0 { a.outcome.clone() } else { format!("{} {}", a.http, a.outcome) })
            .or_default() += 1;
    }
    let totals = Totals {
        logical_requests: records.len(),
        accepted: accepted.len(),
        gave_up: records.iter().filter(|r| r.gave_up).count(),
        terminal_rows_by_status: by_status,
        client_retries: records.iter().map(|r| r.retries()).sum(),
        duplicate_answers: records.iter().flat_map(|r| &r.answers).filter(|a| a.outcome == "DUPLICATE").count(),
        answers_by_outcome: answers,
        extra_results_absorbed_by_sink: results
            .duplicated()
            .iter()
            .filter(|(id, _)| accepted_all.contains(*id))
            .map(|(_, n)| (n - 1) as usize)
            .sum(),
        resubmitted: resubmits.len(),
        warmup_first_completion_s,
        drain_s,
    };
    let report = Report {
        run_id,
        run_dir: run_dir.clone(),
        started_unix_ms: started_ms,
        finished_unix_ms: now_unix_ms(),
        passed: checks.iter().all(|c| c.passed),
        plan,
        faults,
        checks,
        outage,
        totals,
        counters,
        audit: counts,
        poison,
    };
    report.write(&run_dir)?;
    write_records(&run_dir, &records, &resubmits)?;
    Ok(report)
}

/// The client's full record (every key, every answer), for digging into a failed check.
fn write_records(dir: &Path, records: &[load::KeyRecord], resubmits: &[load::Resubmit]) -> anyhow::Result<()> {
    let value = serde_json::json!({ "keys": records, "resubmits": resubmits });
    std::fs::write(dir.join("client.json"), serde_json::to_vec(&value)?)?;
    Ok(())
}
