//! The run's results: one serialisable [`Report`], written as `results.json`, `summary.md`
//! and `chart.svg`.
mod markdown;
mod svg;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::findmax::{Criteria, StepVerdict};
use crate::ledger::Ledger;
use crate::stages::Segment;
use crate::stats::{Percentiles, TimelinePoint};

pub const JSON_FILE: &str = "results.json";
pub const MARKDOWN_FILE: &str = "summary.md";
pub const SVG_FILE: &str = "chart.svg";

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run_id: String,
    pub started_unix_ms: i64,
    pub settings: Settings,
    pub phases: Vec<PhaseReport>,
    pub find_max: Option<FindMaxReport>,
    pub ledger: Ledger,
    /// Per second of the whole run, all phases on one clock.
    pub timeline: Vec<TimelinePoint>,
}

/// What the run was asked to do.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub api: crate::client::Api,
    pub ingest_url: String,
    pub grpc_url: String,
    pub sink_url: String,
    pub model: String,
    pub max_new_tokens: u32,
    pub ignore_eos: bool,
    /// Requests per conversation.
    pub turns: u32,
    pub deadline_ms: Option<u32>,
    pub users: Vec<String>,
    pub prompt_mix: String,
    pub connections: u32,
    pub arrivals: crate::arrivals::ArrivalProcess,
    pub seed: u64,
    pub drain_timeout_s: f64,
    pub ledger_timeout_s: f64,
}

/// Why a phase ran.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "fraction")]
pub enum PhaseRole {
    /// The fixed-rate run of `loadtest run`.
    Run,
    /// A find-max step climbing the rate.
    Step,
    /// A find-max step bisecting between sustained and failed.
    Refine,
    /// A run at this fraction of the maximum sustained rate.
    Fraction(f64),
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub label: String,
    pub role: PhaseRole,
    pub offered_rps: f64,
    pub duration_s: f64,
    /// Start of the phase on the run clock (the timeline's seconds).
    pub started_at_s: f64,
    /// First scheduled send → last request ended.
    pub elapsed_s: f64,
    pub sent: u64,
    pub accepted: u64,
    /// COMPLETED requests per second over `elapsed_s` (or `duration_s`, if longer).
    pub throughput_rps: f64,
    /// Requests by how they ended at the client: a terminal status, `rejected:<code>`,
    /// `failed` or `timed_out`.
    pub outcomes: BTreeMap<String, u64>,
    /// Accepted requests by the status of their sink row (`NO_ROW` when there is none).
    pub statuses: BTreeMap<String, u64>,
    /// Intended send → terminal outcome received, COMPLETED requests only.
    pub e2e: Percentiles,
    /// Intended send → first non-empty token, COMPLETED requests only.
    pub ttft: Percentiles,
    /// Intended send → actually sent (the harness's own lag; should stay near zero).
    pub send_lag: Percentiles,
    pub e2e_by_prompt: BTreeMap<String, Percentiles>,
    /// Service time per stage and time per hop, from the sink rows' stage timings.
    pub stages: Vec<Segment>,
    pub error_samples: Vec<String>,
    /// For find-max steps: whether the mesh kept up, and why not.
    pub verdict: Option<StepVerdict>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FindMaxReport {
    pub criteria: Criteria,
    pub start_rps: f64,
    pub step_factor: f64,
    pub step_duration_s: f64,
    /// The highest offered rate a step sustained; `None` when not even the first did.
    pub max_sustained_rps: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot encode the results: {0}")]
    Json(#[from] serde_json::Error),
}

impl Report {
    /// Writes the three files into `dir` (created if need be); returns their paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ReportError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let files = [
            (JSON_FILE, serde_json::to_string_pretty(self)?),
            (MARKDOWN_FILE, self.markdown()),
            (SVG_FILE, svg::render(&self.timeline, &self.phase_markers())),
        ];
        files
            .into_iter()
            .map(|(name, text)| {
                let path = dir.join(name);
                std::fs::write(&path, text).map_err(io(&path))?;
                Ok(path)
            })
            .collect()
    }

    pub fn markdown(&self) -> String {
        markdown::render(self)
    }

    /// Where each phase starts on the chart, with its label; none for a single phase.
    fn phase_markers(&self) -> Vec<(f64, String)> {
        if self.phases.len() < 2 {
            return Vec::new();
        }
        self.phases.iter().map(|p| (p.started_at_s, p.label.clone())).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ledger::Discrepancy;

    pub fn percentiles(p50: f64, p99: f64) -> Percentiles {
        Percentiles {
            count: 10,
            min_ms: p50 / 2.0,
            mean_ms: p50,
            p50_ms: p50,
            p90_ms: p99 * 0.8,
            p99_ms: p99,
            p999_ms: p99,
            max_ms: p99,
        }
    }

    pub fn phase(label: &str, role: PhaseRole, rate: f64, verdict: Option<StepVerdict>) -> PhaseReport {
        PhaseReport {
            label: label.into(),
            role,
            offered_rps: rate,
            duration_s: 10.0,
            started_at_s: 0.0,
            elapsed_s: 10.5,
            sent: 100,
            accepted: 99,
            throughput_rps: 9.4,
            outcomes: BTreeMap::from([
                ("COMPLETED".into(), 98),
                ("rejected:overloaded".into(), 1),
                ("timed_out".into(), 1),
            ]),
            statuses: BTreeMap::from([("COMPLETED".into(), 98), ("EXPIRED".into(), 1)]),
            e2e: percentiles(120.0, 480.0),
            ttft: percentiles(40.0, 90.0),
            send_lag: percentiles(0.1, 0.5),
            e2e_by_prompt: BTreeMap::from([("short".into(), percentiles(100.0, 300.0))]),
            stages: vec![Segment {
                name: "ingest → preprocess".into(),
                kind: crate::stages::SegmentKind::Hop,
                latency: percentiles(0.8, 2.5),
            }],
            error_samples: vec!["HTTP: connection refused <local>".into()],
            verdict,
        }
    }

    pub fn report(phases: Vec<PhaseReport>, find_max: Option<FindMaxReport>, passed: bool) -> Report {
        let missing =
            if passed { Discrepancy::default() } else { Discrepancy { count: 1, sample: vec!["r-lost".into()] } };
        Report {
            run_id: "abc123".into(),
            started_unix_ms: 0,
            settings: Settings {
                api: crate::client::Api::Ws,
                ingest_url: "http://127.0.0.1:8080".into(),
                grpc_url: "http://127.0.0.1:50051".into(),
                sink_url: "http://127.0.0.1:8090".into(),
                model: "tiny-llama".into(),
                max_new_tokens: 32,
                ignore_eos: false,
                turns: 1,
                deadline_ms: None,
                users: vec!["lt-abc123-0".into()],
                prompt_mix: "short=6,medium=3,long=1".into(),
                connections: 4,
                arrivals: crate::arrivals::ArrivalProcess::Poisson,
                seed: 1,
                drain_timeout_s: 30.0,
                ledger_timeout_s: 30.0,
            },
            phases,
            find_max,
            ledger: Ledger {
                accepted: 99,
                rows: 99 - missing.count,
                missing,
                duplicates: Discrepancy::default(),
                unknown: Discrepancy::default(),
                sink_error: None,
                passed,
            },
            timeline: (0..12)
                .map(|s| TimelinePoint {
                    second: s,
                    sent: 10,
                    accepted: 10,
                    completed: if s == 0 { 0 } else { 9 },
                    errors: 0,
                    e2e_p50_ms: if s == 0 { 0.0 } else { 100.0 + s as f64 },
                    e2e_p90_ms: if s == 0 { 0.0 } else { 200.0 },
                    e2e_p99_ms: if s == 0 { 0.0 } else { 450.0 },
                })
                .collect(),
        }
    }

    #[test]
    fn the_three_files_are_written_and_the_json_reads_back() {
        let dir = std::env::temp_dir().join(format!("millrace-loadtest-test-{}", std::process::id()));
        let report = report(vec![phase("run", PhaseRole::Run, 10.0, None)], None, true);
        let files = report.write(&dir).unwrap();
        assert_eq!(files.len(), 3);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(JSON_FILE)).unwrap()).unwrap();
        assert_eq!(json["run_id"], "abc123");
        assert_eq!(json["phases"][0]["e2e"]["p99_ms"], 480.0);
        assert_eq!(json["phases"][0]["role"]["kind"], "run");
        assert_eq!(json["ledger"]["passed"], true);
        assert_eq!(json["timeline"].as_array().unwrap().len(), 12);
        assert!(std::fs::read_to_string(dir.join(SVG_FILE)).unwrap().starts_with("<svg"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
