//! The compose deployment, started and used for real (issue 14): images built locally,
//! `compose.yaml` brought up to healthy, the mesh used through its published ports (an OpenAI
//! streaming answer, a blocked query, WebSocket and gRPC queries, a burst with its ledger
//! checked in PostgreSQL, every service scraped by Prometheus), each service restarted and then
//! killed under load with the time to recover reported, and `down -v` leaving nothing behind.
//! The report goes to `target/deploy-e2e/<run>/report.{md,json}`, container logs beside it.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use millrace_deploy_e2e::{DEV_API_KEY, Ports, SERVICES, Stack, Tool, all_services, build_images, docker_available};
use millrace_testkit::{service_binary, skip_or_fail, workspace_root};
use serde::Serialize;
use serde_json::{Value, json};

/// How long `up` may take to bring every container to healthy (debug binaries, cold volumes).
const UP: Duration = Duration::from_secs(300);
/// How long a service may take to serve again after a restart or a kill.
const RECOVERY: Duration = Duration::from_secs(180);
/// The model of the load: the one compose.yaml's mesh serves (its default).
const LOAD_MODEL: &str = "smollm2-135m";

#[derive(Debug, Default, Serialize)]
struct Report {
    compose: String,
    project: String,
    up_s: f64,
    checks: Vec<String>,
    burst: Option<Value>,
    faults: Vec<Fault>,
    load_under_faults: Option<Value>,
    left_after_down: Vec<String>,
}

/// One restart or kill of a service and how long the mesh took to serve again.
#[derive(Debug, Serialize)]
struct Fault {
    service: String,
    how: String,
    /// Whether the background load was still running when the fault was injected.
    under_load: bool,
    /// From the fault to the container's health check passing (the check runs every 10 s, and
    /// Docker 20.10 has no shorter start interval: this is mostly that period).
    healthy_s: f64,
    /// From the fault to the first new request answered and stored by the sink.
    recovered_s: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_starts_serves_survives_restarts_and_kills_and_tears_down() {
    const TEST: &str = "deploy-e2e compose";
    if let Err(why) = docker_available().await {
        skip_or_fail(TEST, &why);
        return;
    }
    let root = workspace_root();
    let run_dir = root.join("target/deploy-e2e").join(format!("run-{}", unix_ms()));
    std::fs::create_dir_all(&run_dir).unwrap();
    let mut report = Report::default();
    let result = scenario(&root, &run_dir, &mut report).await;
    let written = write_report(&run_dir, &report);
    eprintln!("[deploy-e2e] report: {}", run_dir.join("report.md").display());
    result.unwrap_or_else(|e| panic!("{e:#}\n(logs in {})", run_dir.join("logs").display()));
    written.unwrap();
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
}

async fn scenario(root: &Path, run_dir: &Path, report: &mut Report) -> anyhow::Result<()> {
    let tool = Tool::detect().await?;
    let images = build_images(root).await?;
    let project = format!("millrace-e2e-{}", std::process::id());
    let mut stack = Stack::new(tool, &project, root, images, Ports::free()?, &run_dir.join("logs"));
    report.compose = format!("{tool:?}");
    report.project = project;

    // The observability profile (Jaeger, Grafana, the NATS exporter) is not started here — none
    // of its images can be built without a registry — but the file must render with it.
    stack.compose(&["--profile", "observability", "config", "-q"]).await?;
    report.checks.push("compose.yaml renders with the observability profile too (config -q)".into());

    // 1. Up, every container healthy.
    report.up_s = stack.up(UP).await?.as_secs_f64();
    eprintln!("[deploy-e2e] {} containers healthy in {:.1} s", all_services().len(), report.up_s);

    // 2. Through the published ports.
    let http = reqwest::Client::new();
    let pieces = openai_stream(&http, &stack.ports).await?;
    report.checks.push(format!("OpenAI streaming chat: answer in {pieces} pieces, stored COMPLETED"));
    blocked_query(&http, &stack.ports).await?;
    report.checks.push("blocked query: 200 content_filter, stored BLOCKED_INPUT".into());
    for api in ["ws", "grpc"] {
        let summary = loadtest(root, run_dir, &stack.ports, api, 2.0, 3.0).await?.wait().await?;
        report.checks.push(format!("{api}: {} queries, ledger passed", summary["accepted"]));
    }
    let burst = loadtest(root, run_dir, &stack.ports, "http", 10.0, 10.0).await?.wait().await?;
    postgres_ledger(&stack, &burst).await?;
    report
        .checks
        .push(format!("burst: {} accepted, {} rows in PostgreSQL, 0 duplicates", burst["accepted"], burst["rows"]));
    report.burst = Some(burst);
    let names = prometheus_scraped_every_service(&http, &stack.ports).await?;
    let names_file = run_dir.join("metric-names.txt");
    std::fs::write(&names_file, names.join("\n") + "\n")?;
    report.checks.push(format!("Prometheus scraped all seven services ({} metric names)", names.len()));
    let rules = prometheus_rules_loaded(&http, &stack.ports).await?;
    report.checks.push(format!("Prometheus loaded the {rules} alert rules, every one evaluating"));
    dashboard_and_rules_use_exported_names(root, &names_file).await?;
    report.checks.push("every metric of the dashboard and the alert rules is exported".into());

    // 3. Each service restarted, then killed, under load.
    // Sized to outlast the fourteen faults on the CI machine; a fault after its end is reported
    // as not under load.
    let load = loadtest(root, run_dir, &stack.ports, "http", 2.0, 200.0).await?;
    for how in ["restart", "kill"] {
        for service in SERVICES {
            let under_load = load.running();
            let started = Instant::now();
            match how {
                "restart" => stack.compose(&["restart", service]).await.map(drop)?,
                _ => {
                    // `docker kill` counts as a deliberate stop: the restart policy leaves the
                    // container down, so it is started again as an operator would.
                    stack.compose(&["kill", "-s", "KILL", service]).await?;
                    stack.up_service(service).await?;
                }
            }
            serve_again(&http, &stack.ports, RECOVERY).await.with_context(|| format!("{how} {service}"))?;
            let recovered_s = started.elapsed().as_secs_f64();
            stack.wait_healthy(&[service], RECOVERY).await?;
            let healthy_s = started.elapsed().as_secs_f64();
            eprintln!(
                "[deploy-e2e] {how} {service}: served again after {recovered_s:.1} s, healthy after {healthy_s:.1} s"
            );
            report.faults.push(Fault { service: service.into(), how: how.into(), under_load, healthy_s, recovered_s });
        }
    }
    let under_faults = load.wait().await?;
    postgres_ledger(&stack, &under_faults).await?;
    report.load_under_faults = Some(under_faults);
    stack.wait_healthy(&all_services(), UP).await?;
    stack.save_logs().await;

    // 4. Down: nothing of the project is left.
    report.left_after_down = stack.down().await?;
    ensure!(report.left_after_down.is_empty(), "left after down -v: {:?}", report.left_after_down);
    Ok(())
}

/// A streamed OpenAI chat answer: several content pieces, `[DONE]`, and a COMPLETED row whose
/// completion is the streamed text. Returns the number of pieces.
async fn openai_stream(http: &reqwest::Client, ports: &Ports) -> anyhow::Result<usize> {
    let response = http
        .post(format!("{}/v1/chat/completions", ports.ingest_url()))
        .bearer_auth(DEV_API_KEY)
        .json(&json!({
            "messages": [{ "role": "user", "content": "What is the capital of France?" }],
            "max_tokens": 24,
            "stream": true,
        }))
        .send()
        .await?;
    ensure!(response.status().is_success(), "chat: {}", response.status());
    let request_id = header(&response, "x-request-id")?;
    let body = response.text().await?;
    let mut pieces = Vec::new();
    let mut done = false;
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data)?;
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
            pieces.push(text.to_owned());
        }
    }
    ensure!(done, "the stream did not end with [DONE]: {body}");
    ensure!(pieces.len() > 1, "the answer came in {} piece(s), not streamed: {body}", pieces.len());
    let row = stored_row(http, ports, &request_id).await?;
    ensure!(row["status"] == "COMPLETED", "row: {row}");
    ensure!(row["completion"].as_str() == Some(&pieces.concat()), "stored {row} vs streamed {pieces:?}");
    Ok(pieces.len())
}

/// An insult is refused by input moderation: `content_filter`, a BLOCKED_INPUT row.
async fn blocked_query(http: &reqwest::Client, ports: &Ports) -> anyhow::Result<()> {
    let response = http
        .post(format!("{}/v1/chat/completions", ports.ingest_url()))
        .bearer_auth(DEV_API_KEY)
        .json(&json!({ "messages": [{ "role": "user", "content": "you are a worthless idiot" }] }))
        .send()
        .await?;
    ensure!(response.status().is_success(), "blocked chat: {}", response.status());
    let request_id = header(&response, "x-request-id")?;
    let answer: Value = response.json().await?;
    ensure!(answer["choices"][0]["finish_reason"] == "content_filter", "answer: {answer}");
    let row = stored_row(http, ports, &request_id).await?;
    ensure!(row["status"] == "BLOCKED_INPUT", "row: {row}");
    Ok(())
}

/// Returns once a new request is answered COMPLETED and its row is readable from the sink.
async fn serve_again(http: &reqwest::Client, ports: &Ports, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < timeout {
        match answer_once(http, ports).await {
            Ok(()) => return Ok(()),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("not serving within {timeout:?}: {last}")
}

async fn answer_once(http: &reqwest::Client, ports: &Ports) -> anyhow::Result<()> {
    let response = http
        .post(format!("{}/v1/chat/completions", ports.ingest_url()))
        .bearer_auth(DEV_API_KEY)
        .timeout(Duration::from_secs(30))
        .json(
            &json!({ "model": LOAD_MODEL, "messages": [{ "role": "user", "content": "Say hello." }], "max_tokens": 4 }),
        )
        .send()
        .await?;
    ensure!(response.status().is_success(), "{}", response.status());
    let request_id = header(&response, "x-request-id")?;
    let row = stored_row(http, ports, &request_id).await?;
    ensure!(row["status"] == "COMPLETED", "row: {row}");
    Ok(())
}

fn header(response: &reqwest::Response, name: &str) -> anyhow::Result<String> {
    Ok(response.headers().get(name).with_context(|| format!("no {name}"))?.to_str()?.to_owned())
}

/// The sink's row of `request_id`, waiting a little for it to be stored.
async fn stored_row(http: &reqwest::Client, ports: &Ports, request_id: &str) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let response = http.get(format!("{}/v1/results/{request_id}", ports.sink_url())).send().await;
        if let Ok(response) = response
            && response.status().is_success()
        {
            return Ok(response.json().await?);
        }
        ensure!(Instant::now() < deadline, "no row for {request_id}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A load-test run in the background (`target/debug/loadtest run`).
struct LoadRun {
    child: tokio::process::Child,
    out: PathBuf,
}

async fn loadtest(
    root: &Path,
    run_dir: &Path,
    ports: &Ports,
    api: &str,
    rate: f64,
    duration_s: f64,
) -> anyhow::Result<LoadRun> {
    let out = run_dir.join(format!("loadtest-{api}-{}", unix_ms()));
    let child = tokio::process::Command::new(service_binary("loadtest")?)
        .args(["run", "--api", api, "--model", LOAD_MODEL, "--max-new-tokens", "8", "--users", "16"])
        .args(["--rate", &rate.to_string(), "--duration-s", &duration_s.to_string()])
        .args([
            "--ingest-url",
            &ports.ingest_url(),
            "--grpc-url",
            &ports.ingest_grpc_url(),
            "--sink-url",
            &ports.sink_url(),
        ])
        .args(["--api-key", DEV_API_KEY, "--ledger-timeout-s", "120", "--drain-timeout-s", "60"])
        .arg("--out")
        .arg(&out)
        .current_dir(root)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting loadtest")?;
    Ok(LoadRun { child, out })
}

impl LoadRun {
    fn running(&self) -> bool {
        self.child.id().is_some() && !self.out.join("results.json").exists()
    }

    /// Waits for the run; `Err` unless its ledger check passed. Returns its summary: accepted,
    /// rows, the users' prefix (for PostgreSQL), and the outcome counts.
    async fn wait(mut self) -> anyhow::Result<Value> {
        let status = self.child.wait().await?;
        let results: Value = serde_json::from_str(
            &std::fs::read_to_string(self.out.join("results.json")).context("loadtest wrote no results.json")?,
        )?;
        let ledger = &results["ledger"];
        ensure!(status.success() && ledger["passed"] == true, "loadtest ledger check failed ({status}): {ledger}");
        let accepted = ledger["accepted"].as_u64().unwrap_or(0);
        ensure!(accepted > 0, "loadtest had nothing accepted: {}", results["phases"]);
        Ok(json!({
            "accepted": accepted,
            "rows": ledger["rows"],
            "duplicates": ledger["duplicates"]["count"],
            "missing": ledger["missing"]["count"],
            "user_prefix": format!("lt-{}-", results["run_id"].as_str().unwrap_or_default()),
            "outcomes": results["phases"][0]["outcomes"],
            "statuses": results["phases"][0]["statuses"],
            "e2e_ms": results["phases"][0]["e2e"],
            "out": self.out.display().to_string(),
        }))
    }
}

/// Every request the load test saw accepted has exactly one row in PostgreSQL itself (the sink
/// API the load test asked is one reader; this is the table).
async fn postgres_ledger(stack: &Stack, summary: &Value) -> anyhow::Result<()> {
    let prefix = summary["user_prefix"].as_str().context("no user prefix")?;
    let counted = stack
        .psql(&format!(
            "select count(*), count(distinct request_id) from results where user_id like '{}%'",
            prefix.replace('\'', "''")
        ))
        .await?;
    let (rows, distinct) = counted.trim().split_once('|').context("psql output")?;
    let (rows, distinct): (u64, u64) = (rows.parse()?, distinct.parse()?);
    ensure!(rows == distinct, "duplicate rows in PostgreSQL: {rows} rows, {distinct} ids");
    let accepted = summary["accepted"].as_u64().unwrap_or(0);
    ensure!(rows >= accepted, "PostgreSQL holds {rows} rows for {accepted} accepted requests");
    ensure!(
        Some(rows) == summary["rows"].as_u64(),
        "PostgreSQL holds {rows} rows, the sink API listed {}",
        summary["rows"]
    );
    Ok(())
}

/// Prometheus (through its published port) has a Millrace metric from each of the seven
/// services; returns every metric name it holds.
async fn prometheus_scraped_every_service(http: &reqwest::Client, ports: &Ports) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer: Value = http
            .get(format!("{}/api/v1/query", ports.prometheus_url()))
            .query(&[("query", r#"count by (service) ({__name__=~"millrace_.+", job="millrace"})"#)])
            .send()
            .await?
            .json()
            .await?;
        let scraped: Vec<&str> = answer["data"]["result"]
            .as_array()
            .map(|r| r.iter().filter_map(|s| s["metric"]["service"].as_str()).collect())
            .unwrap_or_default();
        let missing: Vec<&str> = SERVICES.iter().copied().filter(|s| !scraped.contains(s)).collect();
        if missing.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "Prometheus has no Millrace metric of {missing:?}: {answer}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let names: Value =
        http.get(format!("{}/api/v1/label/__name__/values", ports.prometheus_url())).send().await?.json().await?;
    Ok(names["data"].as_array().context("metric names")?.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect())
}

/// Prometheus (the CI image, Debian's 2.42) loaded `deploy/prometheus/alerts.yml` through
/// compose's mount and has evaluated every rule without error; returns how many rules.
async fn prometheus_rules_loaded(http: &reqwest::Client, ports: &Ports) -> anyhow::Result<usize> {
    // Rules are evaluated every 15 s (evaluation_interval); until then their health is unknown.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer: Value = http.get(format!("{}/api/v1/rules", ports.prometheus_url())).send().await?.json().await?;
        let rules: Vec<&Value> = answer["data"]["groups"]
            .as_array()
            .context("rule groups")?
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        ensure!(!rules.is_empty(), "Prometheus loaded no rules: {answer}");
        let not_ok: Vec<String> = rules.iter().filter(|r| r["health"] != "ok").map(|r| r.to_string()).collect();
        if not_ok.is_empty() {
            return Ok(rules.len());
        }
        ensure!(Instant::now() < deadline, "rules not evaluating: {not_ok:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `scripts/check-observability.sh --metric-names`: no panel or rule names a metric the
/// running stack does not export.
async fn dashboard_and_rules_use_exported_names(root: &Path, names_file: &Path) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("bash")
        .arg(root.join("scripts/check-observability.sh"))
        .arg("--metric-names")
        .arg(names_file)
        .current_dir(root)
        .status()
        .await?;
    ensure!(status.success(), "scripts/check-observability.sh --metric-names {} failed", names_file.display());
    Ok(())
}

fn write_report(run_dir: &Path, report: &Report) -> anyhow::Result<()> {
    std::fs::write(run_dir.join("report.json"), serde_json::to_string_pretty(report)?)?;
    let mut md = format!(
        "# Compose deployment test\n\nCompose {} · project `{}` · every container healthy after **{:.1} s**\n\n",
        report.compose, report.project, report.up_s
    );
    for check in &report.checks {
        md.push_str(&format!("- {check}\n"));
    }
    md.push_str("\n| fault | service | under load | served again (s) | healthy (s) |\n|---|---|---|---:|---:|\n");
    for f in &report.faults {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} |\n",
            f.how, f.service, f.under_load, f.recovered_s, f.healthy_s
        ));
    }
    if let Some(load) = &report.load_under_faults {
        md.push_str(&format!(
            "\nLoad during the faults: {} accepted, {} rows, {} missing, {} duplicates; outcomes {}\n",
            load["accepted"], load["rows"], load["missing"], load["duplicates"], load["outcomes"]
        ));
    }
    md.push_str(&format!("\nLeft after `down -v`: {:?}\n", report.left_after_down));
    std::fs::write(run_dir.join("report.md"), md)?;
    Ok(())
}
