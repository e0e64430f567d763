//! The report: `report.json` (everything) and `report.md` (the fault table, the checks, memory
//! during the outage, totals, counters).
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use millrace_testkit::metrics::metric;
use serde::Serialize;

use crate::audit::OriginCount;
use crate::checks::Check;
use crate::config::Plan;
use crate::faults::{FaultRecord, OutageReport, Poison};
use crate::mesh::ChaosMesh;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub started_unix_ms: i64,
    pub finished_unix_ms: i64,
    /// Every invariant held.
    pub passed: bool,
    pub plan: Plan,
    pub faults: Vec<FaultRecord>,
    pub checks: Vec<Check>,
    pub outage: Option<OutageReport>,
    pub totals: Totals,
    pub counters: Counters,
    pub audit: BTreeMap<String, OriginCount>,
    pub poison: Vec<Poison>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub logical_requests: usize,
    pub accepted: usize,
    pub gave_up: usize,
    /// Accepted requests' rows by status.
    pub terminal_rows_by_status: BTreeMap<String, usize>,
    pub client_retries: usize,
    pub duplicate_answers: usize,
    pub answers_by_outcome: BTreeMap<String, usize>,
    /// Results stored in MR_RESULTS beyond the first per request (the sink kept one row each).
    pub extra_results_absorbed_by_sink: usize,
    pub resubmitted: usize,
    pub warmup_first_completion_s: Option<f64>,
    pub drain_s: f64,
}

/// Counters the services export, summed over every start of every process (a killed process's
/// counters are read just before the kill).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    /// `millrace_inference_skipped_total` by reason; absent where no replica exports it.
    pub inference_skipped: BTreeMap<String, f64>,
    /// `millrace_publish_duplicates_total` per process: publishes a stream dropped as duplicates.
    pub publish_duplicates: BTreeMap<String, f64>,
    /// `millrace_redeliveries_total` per process.
    pub redeliveries: BTreeMap<String, f64>,
    /// `millrace_outcomes_overruled_total` per process (where exported).
    pub outcomes_overruled: BTreeMap<String, f64>,
}

impl Counters {
    pub async fn collect(mesh: &ChaosMesh, killed: &[(String, String)]) -> Counters {
        let mut texts: Vec<(String, String)> = killed.to_vec();
        for service in &mesh.services {
            if let Ok(text) = service.process.metrics().await {
                texts.push((service.label.clone(), text));
            }
        }
        let mut counters = Counters::default();
        for (label, text) in &texts {
            for reason in ["completion_published", "outcome_decided"] {
                if let Some(v) = metric(text, "millrace_inference_skipped_total", &[("reason", reason)]) {
                    *counters.inference_skipped.entry(reason.to_owned()).or_default() += v;
                }
            }
            let add = |map: &mut BTreeMap<String, f64>, name: &str| {
                if let Some(v) = metric(text, name, &[]) {
                    *map.entry(label.clone()).or_default() += v;
                }
            };
            add(&mut counters.publish_duplicates, "millrace_publish_duplicates_total");
            add(&mut counters.redeliveries, "millrace_redeliveries_total");
            add(&mut counters.outcomes_overruled, "millrace_outcomes_overruled_total");
        }
        counters
    }
}

impl Report {
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }

    /// The fault table as the Markdown report shows it.
    pub fn fault_table(&self) -> String {
        let mut md = String::new();
        let target = self.plan.recovery_target_s;
        md.push_str("| fault | injected (s) | ready again (s) | recovery (s) | < target | requests in window: accepted / gave up | failed attempts in window |\n");
        md.push_str("|---|---:|---:|---:|:-:|---:|---|\n");
        let t0 = self.started_unix_ms;
        for f in &self.faults {
            let secs = |ms: i64| format!("{:.1}", (ms - t0) as f64 / 1000.0);
            let attempts: Vec<String> = f.window_failed_attempts.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} / {} of {} | {} |",
                f.name,
                secs(f.injected_ms),
                f.ready_ms.map_or("—".into(), secs),
                f.recovery_s.map_or("none".into(), |s| format!("{s:.2}")),
                if f.recovery_met { "yes" } else { "**MISS**" },
                f.window_accepted,
                f.window_gave_up,
                f.window_requests,
                if attempts.is_empty() { "—".into() } else { attempts.join(", ") },
            );
        }
        let _ = writeln!(
            md,
            "\nRecovery: from the restarted process being ready (or the fault's end) to the first COMPLETED row of a request sent after it; target {target} s."
        );
        let cluster: Vec<&FaultRecord> = self.faults.iter().filter(|f| f.ended_ms.is_some()).collect();
        if !cluster.is_empty() {
            md.push_str("\n| NATS fault | leaders moved (s) | node back → replicas current (s) | longest stretch without an accepted submit (s) | … without a COMPLETED row (s) |\n");
            md.push_str("|---|---:|---:|---:|---:|\n");
            let secs = |v: Option<f64>| v.map_or("—".to_owned(), |s| format!("{s:.1}"));
            for f in cluster {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    f.name,
                    secs(f.leaders_moved_s),
                    secs(f.rejoined_s),
                    secs(f.accept_stall_s),
                    secs(f.completion_stall_s)
                );
            }
            md.push_str("\nFor the NATS faults \"ready again\" is when every replicated stream had a leader on another node; the stalls are measured from the injection to the end of the fault (the node started again or the partition healed, and every replica current).\n");
        }
        md
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Chaos run {}: {}\n", self.run_id, if self.passed { "PASSED" } else { "FAILED" });
        let p = &self.plan;
        let _ = writeln!(
            md,
            "Schedule {:?}, model {}, {} req/s ({:?}), {} users, {} new tokens, ack wait {} s, stream limit {} msgs, seed {}; {:.0} s in all.\n",
            p.schedule,
            p.model,
            p.rate,
            p.arrivals,
            p.users,
            p.max_new_tokens,
            p.ack_wait_s,
            p.stream_max_msgs,
            p.seed,
            (self.finished_unix_ms - self.started_unix_ms) as f64 / 1000.0
        );
        md.push_str("## Invariants\n\n");
        for c in &self.checks {
            let _ = writeln!(md, "- **{}** {}: {}", if c.passed { "PASS" } else { "FAIL" }, c.name, c.detail);
        }
        md.push_str("\n## Faults\n\n");
        md.push_str(&self.fault_table());
        for f in &self.faults {
            if !f.notes.is_empty() || f.error.is_some() {
                let _ = writeln!(md, "\n- {}: {}", f.name, f.detail);
                for n in &f.notes {
                    let _ = writeln!(md, "  - {n}");
                }
                if let Some(e) = &f.error {
                    let _ = writeln!(md, "  - error: {e}");
                }
            }
        }
        if let Some(o) = &self.outage {
            let _ = writeln!(md, "\n## Outage: {} stopped for {} s\n", o.stage, o.secs);
            md.push_str("| process | RSS before (MiB) | peak RSS (MiB) |\n|---|---:|---:|\n");
            for (label, rss) in &o.rss {
                let _ = writeln!(
                    md,
                    "| {label} | {:.1} | {:.1} |",
                    rss.before_kib as f64 / 1024.0,
                    rss.peak_kib as f64 / 1024.0
                );
            }
            let peaks: Vec<String> = o.peak_stream_msgs.iter().map(|(s, n)| format!("{s} {n}")).collect();
            let _ = writeln!(md, "\nPeak stream depth (msgs): {}.", peaks.join(", "));
            let answers: Vec<String> = o.answers.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            let _ = writeln!(md, "Submit answers during the outage: {}.", answers.join(", "));
        }
        let t = &self.totals;
        md.push_str("\n## Totals\n\n");
        let _ = writeln!(
            md,
            "- logical requests {}, accepted {}, given up {}, client retries {}, DUPLICATE answers {}, resubmitted after the broker restart {}",
            t.logical_requests, t.accepted, t.gave_up, t.client_retries, t.duplicate_answers, t.resubmitted
        );
        let statuses: Vec<String> = t.terminal_rows_by_status.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let _ = writeln!(md, "- terminal rows by status: {}", statuses.join(", "));
        let answers: Vec<String> = t.answers_by_outcome.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        let _ = writeln!(md, "- submit answers: {}", answers.join(", "));
        let _ = writeln!(
            md,
            "- extra results stored in MR_RESULTS and absorbed by the sink's key: {}",
            t.extra_results_absorbed_by_sink
        );
        let _ = writeln!(
            md,
            "- first completion after the load started: {} s; drain after the load stopped: {:.1} s",
            t.warmup_first_completion_s.map_or("none".into(), |s| format!("{s:.2}")),
            t.drain_s
        );
        let c = &self.counters;
        md.push_str("\n## Counters (all starts of every process)\n\n");
        let map = |m: &BTreeMap<String, f64>| {
            if m.is_empty() {
                "not exported".to_owned()
            } else {
                m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            }
        };
        let _ = writeln!(
            md,
            "- inference skipped redelivered work (`millrace_inference_skipped_total`): {}",
            map(&c.inference_skipped)
        );
        let _ = writeln!(md, "- publishes dropped as duplicates by the streams: {}", map(&c.publish_duplicates));
        let _ = writeln!(md, "- redeliveries: {}", map(&c.redeliveries));
        let _ = writeln!(md, "- outcomes overruled by an earlier decision: {}", map(&c.outcomes_overruled));
        md.push_str("\n## What the interest-retention streams stored (read by the suite's own consumer)\n\n");
        for (origin, count) in &self.audit {
            let _ = writeln!(
                md,
                "- {origin}: {} stored, {} read, {} undecodable (poison), {} request ids stored more than once",
                count.stored,
                count.read,
                count.undecodable,
                count.duplicated().len()
            );
        }
        let _ = writeln!(
            md,
            "\nLogs, the JetStream store, the SQLite file and client.json (every key, every answer) are in `{}`.",
            self.run_dir.display()
        );
        md
    }
}
