//! Ingest's Prometheus metrics, in the process-wide default registry that the admin server's
//! `/metrics` exposes (next to the bus metrics): what a client of a followed request (OpenAI
//! chat, WebSocket, gRPC `Generate`) waits for, timed from when ingest started following it.
//! `POST /v1/queries` answers at once and is not followed, so it is not timed here.
use std::sync::LazyLock;

use prometheus::{HistogramVec, register_histogram_vec};

/// 10 ms … 60 s, with 250 ms as a bound so "p95 over 250 ms" is read off a bucket edge.
const BUCKETS: [f64; 13] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0];

fn histogram(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    register_histogram_vec!(name, help, labels, BUCKETS.to_vec()).expect("metric registers once")
}

/// Request received → its terminal result handed to the client, by model and terminal status
/// (`COMPLETED`, …). A request whose result never came (the client's deadline passed) is not
/// timed.
pub static E2E: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "millrace_ingest_e2e_seconds",
        "Followed request received to its terminal result handed to the client (end to end)",
        &["model", "status"],
    )
});

/// Request received → the first moderated text handed to the client (time to first token).
pub static TTFT: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "millrace_ingest_ttft_seconds",
        "Followed request received to its first text handed to the client (time to first token)",
        &["model"],
    )
});
