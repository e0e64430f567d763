//! What the alerts and the dashboard read (deploy/prometheus/alerts.yml,
//! deploy/grafana/dashboards/millrace.json), as the whole mesh exports it after real traffic:
//! ingest's end-to-end and time-to-first-token histograms, and in every service readiness, the
//! supervisor's restart counter, the process collector and the lag of each consumer it reads.
//!
//! Needs `models/prepared` (`scripts/prepare-models.sh`, for `tiny-llama`) and every service
//! binary built.
use std::time::{Duration, Instant};

use millrace_bus::ConsumerSpec;
use millrace_testkit::mesh::{Mesh, MeshOptions};
use millrace_testkit::metrics::metric;
use millrace_testkit::{models_dir, skip_or_fail};
use serde_json::{Value, json};

const MODEL: &str = "tiny-llama";
const REQUESTS: usize = 3;

/// Each service and the durable consumers it reads.
const CONSUMERS: [(&str, &[ConsumerSpec]); 7] = [
    ("ingest", &[]),
    ("preprocess", &[ConsumerSpec::PREPROCESS]),
    ("moderation", &[ConsumerSpec::MODERATION_INPUT, ConsumerSpec::MODERATION_OUTPUT]),
    ("session", &[ConsumerSpec::SESSION, ConsumerSpec::SESSION_RESULTS]),
    ("batcher", &[ConsumerSpec::BATCHER]),
    ("inference", &[ConsumerSpec::INFERENCE]),
    ("sink", &[ConsumerSpec::SINK_RESULTS, ConsumerSpec::SINK_DLQ]),
];

/// One streamed OpenAI chat completion; returns its finish reason.
async fn streamed_chat(mesh: &Mesh, n: usize) -> String {
    let body = json!({
        "model": MODEL,
        "messages": [{ "role": "user", "content": format!("Tell me about the number {n}.") }],
        "max_tokens": 8,
        "stream": true,
    });
    let response =
        reqwest::Client::new().post(mesh.ingest_url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    body.split("\n\n")
        .filter_map(|event| event.trim().strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .filter_map(|data| {
            serde_json::from_str::<Value>(data).unwrap()["choices"][0]["finish_reason"].as_str().map(str::to_owned)
        })
        .last()
        .unwrap_or_else(|| panic!("no finish reason in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_exports_what_alerts_and_dashboard_read() {
    if !models_dir().join("manifest.json").exists() {
        return skip_or_fail("the_mesh_exports_what_alerts_and_dashboard_read", "models/prepared is missing");
    }
    let mesh = Mesh::start(MeshOptions { model: MODEL.into(), ..MeshOptions::default() }).await.expect("mesh");
    for n in 0..REQUESTS {
        let finish = streamed_chat(&mesh, n).await;
        assert!(["stop", "length"].contains(&finish.as_str()), "request {n} finished {finish:?}\n{}", mesh.logs());
    }

    let ingest = mesh.metrics("ingest").await.unwrap();
    let completed = [("model", MODEL), ("status", "COMPLETED")];
    let count = |name: &str, labels: &[(&str, &str)]| metric(&ingest, name, labels);
    assert_eq!(count("millrace_ingest_e2e_seconds_count", &completed), Some(REQUESTS as f64), "{ingest}");
    assert_eq!(count("millrace_ingest_ttft_seconds_count", &[("model", MODEL)]), Some(REQUESTS as f64));
    let e2e = count("millrace_ingest_e2e_seconds_sum", &completed).unwrap();
    let ttft = count("millrace_ingest_ttft_seconds_sum", &[("model", MODEL)]).unwrap();
    assert!(0.0 < ttft && ttft <= e2e, "first text (Σ {ttft} s) comes before the result (Σ {e2e} s)");

    for (service, consumers) in CONSUMERS {
        let text = mesh.metrics(service).await.unwrap();
        assert_eq!(metric(&text, "millrace_ready", &[]), Some(1.0), "{service} ready");
        assert!(metric(&text, "process_start_time_seconds", &[]).is_some(), "{service}: no process collector");
        assert!(metric(&text, "millrace_supervisor_restarts_total", &[]).is_some(), "{service}: no restart counter");
        for spec in consumers {
            // Every request is through: the consumer's lag settles at 0 within a poll or two.
            let labels = [("stream", spec.edge.stream), ("consumer", spec.durable)];
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let text = mesh.metrics(service).await.unwrap();
                let lag = (
                    metric(&text, "millrace_consumer_pending_messages", &labels),
                    metric(&text, "millrace_consumer_ack_pending_messages", &labels),
                );
                if lag == (Some(0.0), Some(0.0)) {
                    break;
                }
                assert!(Instant::now() < deadline, "{service}: lag of {} is {lag:?}", spec.durable);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
