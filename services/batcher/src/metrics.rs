//! The batcher's Prometheus metrics, in the process-wide default registry that the admin
//! server's `/metrics` exposes (next to the bus metrics).
use std::sync::LazyLock;

use prometheus::{
    HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, register_histogram_vec, register_int_counter,
    register_int_counter_vec, register_int_gauge_vec,
};

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    register_histogram_vec!(name, help, &["model"], buckets).expect("metric registers once")
}

/// Requests per batch: 1, 2, 4 … 512.
pub static BATCH_SIZE: LazyLock<HistogramVec> = LazyLock::new(|| {
    let buckets = prometheus::exponential_buckets(1.0, 2.0, 10).expect("valid buckets");
    histogram("millrace_batcher_batch_size", "Requests per dispatched batch", buckets)
});

/// Prompt tokens per batch: 16 … 131072.
pub static BATCH_TOKENS: LazyLock<HistogramVec> = LazyLock::new(|| {
    let buckets = prometheus::exponential_buckets(16.0, 2.0, 14).expect("valid buckets");
    histogram("millrace_batcher_batch_tokens", "Prompt tokens per dispatched batch", buckets)
});

/// Arrival in the queue to dispatch: 100 µs … ~26 s.
pub static QUEUE_WAIT: LazyLock<HistogramVec> = LazyLock::new(|| {
    let buckets = prometheus::exponential_buckets(0.0001, 2.0, 19).expect("valid buckets");
    histogram(
        "millrace_batcher_queue_wait_seconds",
        "Time a request waited in the batcher queue before its batch",
        buckets,
    )
});

pub static DISPATCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "millrace_batcher_dispatches_total",
        "Batches dispatched, by reason",
        &["model", "reason"]
    )
    .expect("metric registers once")
});

/// Requests dropped before a batch, by reason (`expired`, `cancelled`).
pub static DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "millrace_batcher_dropped_total",
        "Requests that left the batcher without a batch (expired or cancelled)",
        &["model", "reason"]
    )
    .expect("metric registers once")
});

/// Cancel notices heard (whether or not their request was here).
pub static CANCEL_NOTICES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("millrace_batcher_cancel_notices_total", "Cancel notices received")
        .expect("metric registers once")
});

pub static QUEUE_DEPTH: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("millrace_batcher_queue_depth", "Requests queued for a batch", &["model"])
        .expect("metric registers once")
});

pub static IN_FLIGHT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "millrace_batcher_in_flight_batches",
        "Batches of a model dispatched and not yet acked by inference, as the batcher counts them",
        &["model"]
    )
    .expect("metric registers once")
});
