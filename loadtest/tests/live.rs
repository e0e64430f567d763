//! The `loadtest` binary against the real mesh: NATS and all seven services as deployed (one
//! process each, `tiny-llama` for speed), driven over each of ingest's three APIs, then
//! `find-max`, real refusals, and finally a ledger that fails because the sink is gone.
//!
//! Needs `models/prepared/manifest.json` (`scripts/prepare-models.sh`) and every service binary
//! (`cargo build --workspace --bins`). One mesh for every phase: starting one costs seconds.
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use millrace_testkit::mesh::{Mesh, MeshOptions};
use serde_json::Value;

/// The stages a completed request passes, in pipeline order (the services' `STAGE` consts).
const STAGES: [&str; 7] =
    ["ingest", "preprocess", "moderation-input", "session", "batcher", "inference", "moderation-output"];
/// No single `loadtest` invocation here should take anywhere near this long.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// One finished `loadtest` invocation.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// `results.json`, `Null` when it was not written.
    results: Value,
    out: PathBuf,
}

impl Outcome {
    /// Everything needed to see why an assertion failed.
    fn context(&self) -> String {
        format!("exit {:?}\n--- stderr ---\n{}\n--- stdout ---\n{}", self.status.code(), self.stderr, self.stdout)
    }

    fn phase(&self, index: usize) -> &Value {
        &self.results["phases"][index]
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}\n{}", self.context()))
    }
}

/// Flags of every healthy run: short answers, few users (each one's rows are listed for the
/// ledger), and timeouts no healthy mesh comes near.
const COMMON: [&str; 8] =
    ["--max-new-tokens", "8", "--users", "8", "--drain-timeout-s", "30", "--ledger-timeout-s", "30"];

/// Runs `loadtest <args…> <common…>` against `mesh`, its report into a fresh folder under `dir`.
async fn loadtest(mesh: &Mesh, dir: &Path, name: &str, args: &[&str], common: &[&str]) -> Outcome {
    let out = dir.join(name);
    let started = Instant::now();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadtest"));
    command
        .args(args)
        .args(common)
        .args(["--ingest-url", &format!("http://{}", mesh.ingest_http)])
        .args(["--grpc-url", &format!("http://{}", mesh.ingest_grpc)])
        .args(["--sink-url", &format!("http://{}", mesh.sink_http)])
        .arg("--out")
        .arg(&out)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    // The harness reads MILLRACE_LOADTEST_* from the environment: only the flags above count.
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("MILLRACE_LOADTEST_")) {
        command.env_remove(key);
    }
    let output = tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("loadtest {name} ran past {RUN_LIMIT:?}; mesh logs:\n{}", mesh.logs()))
        .expect("starting loadtest");
    let results = std::fs::read_to_string(out.join("results.json"))
        .ok()
        .map(|text| serde_json::from_str(&text).expect("results.json is JSON"))
        .unwrap_or(Value::Null);
    let outcome = Outcome {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        results,
        out,
    };
    eprintln!("=== loadtest {name}: exit {:?} after {:.1} s", outcome.status.code(), started.elapsed().as_secs_f64());
    eprintln!("{}", outcome.stderr.trim_end());
    outcome
}

fn count(value: &Value) -> u64 {
    value.as_u64().unwrap_or_else(|| panic!("not a count: {value}"))
}

/// The ledger of a healthy run: every accepted request has exactly one row.
fn assert_ledger_passed(run: &Outcome) {
    let ledger = &run.results["ledger"];
    assert_eq!(ledger["passed"], true, "{ledger}\n{}", run.context());
    assert_eq!(ledger["accepted"], ledger["rows"], "{ledger}");
    assert_eq!((count(&ledger["missing"]["count"]), count(&ledger["duplicates"]["count"])), (0, 0), "{ledger}");
    assert_eq!(ledger["sink_error"], Value::Null, "{ledger}");
}

/// A run whose requests all completed: sent = accepted = COMPLETED = rows, latencies measured,
/// every stage of the pipeline in the breakdown.
fn assert_all_completed(run: &Outcome) -> u64 {
    assert!(run.status.success(), "{}", run.context());
    assert_ledger_passed(run);
    let phase = run.phase(0);
    let sent = count(&phase["sent"]);
    assert!(sent > 0, "{phase}");
    assert_eq!(count(&phase["accepted"]), sent, "{}", run.context());
    assert_eq!(count(&run.results["ledger"]["accepted"]), sent);
    assert_eq!(phase["outcomes"], serde_json::json!({ "COMPLETED": sent }), "{}", run.context());
    assert_eq!(phase["statuses"], serde_json::json!({ "COMPLETED": sent }), "{}", run.context());
    for histogram in ["e2e", "ttft"] {
        assert_eq!(count(&phase[histogram]["count"]), sent, "{histogram}: {phase}");
        assert!(phase[histogram]["p50_ms"].as_f64().unwrap() > 0.0, "{histogram}: {phase}");
    }
    assert!(phase["ttft"]["p50_ms"].as_f64() <= phase["e2e"]["p50_ms"].as_f64(), "{phase}");
    let segments: Vec<(&str, &str)> = phase["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["kind"].as_str().unwrap()))
        .collect();
    let services: Vec<&str> = segments.iter().filter(|(_, kind)| *kind == "service").map(|(name, _)| *name).collect();
    for stage in STAGES {
        assert!(services.contains(&stage), "no {stage} in the stage breakdown: {segments:?}");
    }
    assert!(segments.contains(&("ingest → preprocess", "hop")), "{segments:?}");
    assert!(segments.contains(&("mesh total", "total")), "{segments:?}");
    for segment in phase["stages"].as_array().unwrap() {
        assert_eq!(count(&segment["latency"]["count"]), sent, "every row has every stage: {segment}");
    }
    let timeline = run.results["timeline"].as_array().unwrap();
    assert_eq!(timeline.iter().map(|p| count(&p["sent"])).sum::<u64>(), sent);
    assert_eq!(timeline.iter().map(|p| count(&p["completed"])).sum::<u64>(), sent);
    let run_id = run.results["run_id"].as_str().unwrap();
    assert!(
        run.results["settings"]["users"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| { u.as_str().unwrap().starts_with(&format!("lt-{run_id}-")) })
    );
    sent
}

/// Every request refused before acceptance, with the API's error code; nothing to reconcile.
fn assert_all_refused(run: &Outcome, code: &str) {
    assert!(run.status.success(), "nothing accepted, nothing missing: {}", run.context());
    assert_ledger_passed(run);
    let phase = run.phase(0);
    let sent = count(&phase["sent"]);
    assert!(sent > 0);
    assert_eq!(count(&phase["accepted"]), 0, "{phase}");
    assert_eq!(phase["outcomes"], serde_json::json!({ format!("rejected:{code}"): sent }), "{}", run.context());
    assert_eq!(count(&phase["e2e"]["count"]), 0, "refusals are counted, not timed");
    assert_eq!(count(&run.results["ledger"]["accepted"]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_against_the_real_mesh() {
    let started = Instant::now();
    // The session service's per-user rate limit is not under test here.
    let mut mesh = Mesh::start(MeshOptions {
        model: "tiny-llama".into(),
        extra_args: vec![("session", "--rate-per-s=100000".into()), ("session", "--burst=100000".into())],
    })
    .await
    .expect("mesh");
    eprintln!("mesh up after {:.1} s", started.elapsed().as_secs_f64());
    let dir = tempfile::tempdir().unwrap();

    // 1. The chat stream over HTTP: every request completes, the ledger passes, the report has it all.
    let args = ["run", "--api", "http", "--rate", "20", "--duration-s", "3"];
    let http = loadtest(&mesh, dir.path(), "http", &args, &COMMON).await;
    eprintln!("{}", http.stdout.trim_end());
    let sent = assert_all_completed(&http);
    assert!(sent >= 30, "a Poisson schedule of 20/s for 3 s sends about 60: {sent}");
    assert_eq!(http.results["settings"]["api"], "http");
    let summary = http.file("summary.md");
    assert!(summary.starts_with(&format!("# Millrace load test `{}`", http.results["run_id"].as_str().unwrap())));
    assert!(
        summary.contains(&format!("**Ledger: PASSED** — {sent} accepted, {sent} rows, 0 missing, 0 duplicate")),
        "{summary}"
    );
    assert!(summary.contains("## Phase `run` — 20.0 req/s offered for 3 s"), "{summary}");
    assert!(summary.contains("| end to end | ") && summary.contains("| time to first token | "), "{summary}");
    assert!(summary.contains("| inference | service |") && summary.contains("| mesh total | total |"), "{summary}");
    assert_eq!(http.stdout.trim(), summary.trim(), "the summary is printed on stdout");
    let chart = http.file("chart.svg");
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"), "{chart}");
    assert!(chart.contains("End-to-end latency per second") && chart.contains("<polyline"), "{chart}");
    assert!(!chart.contains("no request completed"), "{chart}");

    // 2. The same over WebSocket and gRPC, shorter.
    for api in ["ws", "grpc"] {
        let args = ["run", "--api", api, "--sockets", "2", "--rate", "15", "--duration-s", "2"];
        let run = loadtest(&mesh, dir.path(), api, &args, &COMMON).await;
        assert_all_completed(&run);
        assert_eq!(run.results["settings"]["api"], api);
        assert_eq!(count(&run.results["settings"]["connections"]), 2);
    }

    // Refusals are real too: ingest allows only tiny-llama, and each API carries its code
    // (the OpenAI API answers an unknown model as OpenAI does, `model_not_found`).
    for (api, code) in [("http", "model_not_found"), ("ws", "unknown_model"), ("grpc", "unknown_model")] {
        let name = format!("refused-{api}");
        let refuse =
            ["run", "--api", api, "--model", "nope", "--rate", "3", "--duration-s", "1", "--arrivals", "constant"];
        let run = loadtest(&mesh, dir.path(), &name, &refuse, &COMMON).await;
        assert_all_refused(&run, code);
    }

    // 3. find-max, on a small budget: at least the first step is sustained.
    let find_max = [
        "find-max",
        "--start-rate",
        "10",
        "--step-factor",
        "2",
        "--step-duration-s",
        "3",
        "--max-rate",
        "40",
        "--refine",
        "0",
        "--fractions",
        "0.5",
        "--fraction-duration-s",
        "1",
    ];
    let run = loadtest(&mesh, dir.path(), "find-max", &find_max, &COMMON).await;
    assert!(run.status.success(), "{}", run.context());
    assert_ledger_passed(&run);
    let max = run.results["find_max"]["max_sustained_rps"].as_f64();
    assert!(max.is_some_and(|m| m >= 10.0), "max sustained {max:?}\n{}", run.context());
    let phases = run.results["phases"].as_array().unwrap();
    let roles: Vec<&str> = phases.iter().map(|p| p["role"]["kind"].as_str().unwrap()).collect();
    assert_eq!(roles.last(), Some(&"fraction"), "{roles:?}");
    assert!(roles[..roles.len() - 1].iter().all(|r| *r == "step"), "{roles:?}");
    assert!(phases[..phases.len() - 1].iter().all(|p| p["verdict"]["sustained"].is_boolean()), "{phases:?}");
    assert_eq!(phases[0]["verdict"]["sustained"], true, "{}", run.context());
    assert_eq!(phases.last().unwrap()["offered_rps"].as_f64(), Some(max.unwrap() * 0.5));
    let summary = run.file("summary.md");
    assert!(summary.contains(&format!("## Maximum sustained rate: **{:.1} req/s**", max.unwrap())), "{summary}");
    assert!(summary.contains("### At fractions of the maximum"), "{summary}");

    // 4. LAST: the sink is gone. The mesh still accepts and answers, but no terminal row can be
    // read: the ledger fails, as a report and exit status 1, not as a crash.
    let sink = mesh.services.iter_mut().find(|s| s.name() == "sink").expect("a sink service");
    sink.kill();
    let args = ["run", "--api", "grpc", "--rate", "10", "--duration-s", "1"];
    let short = ["--max-new-tokens", "8", "--users", "4", "--drain-timeout-s", "20", "--ledger-timeout-s", "2"];
    let run = loadtest(&mesh, dir.path(), "no-sink", &args, &short).await;
    assert_eq!(run.status.code(), Some(1), "{}", run.context());
    let ledger = &run.results["ledger"];
    assert_eq!(ledger["passed"], false, "{ledger}\n{}", run.context());
    let accepted = count(&ledger["accepted"]);
    assert!(accepted > 0, "ingest accepts without the sink: {}", run.context());
    assert_eq!(count(&ledger["missing"]["count"]), accepted, "{ledger}");
    assert_eq!(count(&ledger["rows"]), 0, "{ledger}");
    let error = ledger["sink_error"].as_str().unwrap_or_else(|| panic!("no sink_error: {ledger}"));
    assert!(error.starts_with("sink unreachable"), "{error}");
    assert_eq!(run.phase(0)["statuses"], serde_json::json!({ "NO_ROW": accepted }), "{}", run.context());
    assert!(run.stderr.contains("ledger check FAILED: sink unreachable"), "{}", run.context());
    let summary = run.file("summary.md");
    assert!(summary.contains("**Ledger: FAILED**") && summary.contains("sink unreachable"), "{summary}");

    eprintln!("whole test: {:.1} s", started.elapsed().as_secs_f64());
}
