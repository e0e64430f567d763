//! The batcher's Prometheus metrics, in the process-wide default registry that the admin
//! server's `/metrics` exposes (next to the bus metrics).
use std::sync::LazyLock;
use std::time::Duration;

use millrace_proto::v1::ReplicaCapacity;
use prometheus::{
    GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, register_gauge_vec, register_histogram_vec,
    register_int_counter, register_int_counter_vec, register_int_gauge_vec,
};

use crate::queue::{DropReason, Overload};

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    register_histogram_vec!(name, help, labels, buckets).expect("metric registers once")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register_int_gauge_vec!(name, help, labels).expect("metric registers once")
}

/// Requests per batch: 1, 2, 4 … 512.
pub static BATCH_SIZE: LazyLock<HistogramVec> = LazyLock::new(|| {
    let buckets = prometheus::exponential_buckets(1.0, 2.0, 10).expect("valid buckets");
    histogram("millrace_batcher_batch_size", "Requests per dispatched batch", &["model"], buckets)
});

/// Prompt tokens per batch: 16 … 131072.
pub static BATCH_TOKENS: LazyLock<HistogramVec> = LazyLock::new(|| {
    let buckets = prometheus::exponential_buckets(16.0, 2.0, 14).expect("valid buckets");
    histogram("millrace_batcher_batch_tokens", "Prompt tokens per dispatched batch", &["model"], buckets)
});

/// Arrival in the queue to dispatch: 100 µs … ~26 s. Per tenant, to see fair share at work.
pub static QUEUE_WAIT: LazyLock<HistogramVec> = LazyLock::new(|| {
    let buckets = prometheus::exponential_buckets(0.0001, 2.0, 19).expect("valid buckets");
    histogram(
        "millrace_batcher_queue_wait_seconds",
        "Time a request waited in the batcher queue before its batch",
        &["model", "priority", "tenant"],
        buckets,
    )
});

/// Batches dispatched, by reason (`capacity`, or the fallback gate's `size`, `tokens`, `wait`,
/// `idle`).
pub static DISPATCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "millrace_batcher_dispatches_total",
        "Batches dispatched, by reason",
        &["model", "reason"]
    )
    .expect("metric registers once")
});

/// Requests dropped before a batch, by reason (`expired`, `cancelled`, `overloaded`).
pub static DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "millrace_batcher_dropped_total",
        "Requests that left the batcher without a batch (expired, cancelled or refused as overloaded)",
        &["model", "reason"]
    )
    .expect("metric registers once")
});

/// Requests refused on arrival as overloaded, by cause (`queue_full`, `deadline_unreachable`).
pub static REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "millrace_batcher_refused_total",
        "Requests refused on arrival because the queue could not take them in time",
        &["model", "reason"]
    )
    .expect("metric registers once")
});

/// Cancel notices heard (whether or not their request was here).
pub static CANCEL_NOTICES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("millrace_batcher_cancel_notices_total", "Cancel notices received")
        .expect("metric registers once")
});

/// A priority that empties loses its series.
pub static QUEUE_DEPTH: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge("millrace_batcher_queue_depth", "Requests queued for a batch", &["model", "priority"]));

pub static IN_FLIGHT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "millrace_batcher_in_flight_batches",
        "Batches of a model dispatched and not yet acked by inference, as the batcher counts them",
        &["model"],
    )
});

/// Absent while the model has no live report (the fallback gate applies).
pub static FREE_SLOTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "millrace_batcher_free_slots",
        "Free slots the batcher credits a model with from its replicas' capacity reports",
        &["model"],
    )
});

/// Absent until measured.
pub static DRAIN_RATE: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "millrace_batcher_drain_tokens_per_second",
        "Request cost (prompt plus expected new tokens) dispatched per second while the queue holds work (EWMA)",
        &["model"]
    )
    .expect("metric registers once")
});

/// A replica's own figures, as it last reported them (labels `model`, `replica`).
pub static REPLICA_RUNNING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge("millrace_batcher_replica_running", "Sequences a replica reported running", &["model", "replica"])
});
pub static REPLICA_WAITING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "millrace_batcher_replica_waiting",
        "Sequences a replica reported submitted but not yet admitted",
        &["model", "replica"],
    )
});
pub static REPLICA_FREE_SLOTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "millrace_batcher_replica_free_slots",
        "A replica's reported max_running − running − waiting (at least 0)",
        &["model", "replica"],
    )
});
pub static REPLICA_KV_USED_TOKENS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge("millrace_batcher_replica_kv_used_tokens", "KV cache tokens a replica reported in use", &["model", "replica"])
});
pub static REPLICA_KV_BUDGET_TOKENS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge("millrace_batcher_replica_kv_budget_tokens", "A replica's reported KV cache budget", &["model", "replica"])
});
pub static REPLICA_PREFIX_CACHE_TOKENS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "millrace_batcher_replica_prefix_cache_tokens",
        "Tokens a replica reported held by its prefix cache",
        &["model", "replica"],
    )
});

/// The per-replica gauges, in the order of [`replica_figures`].
fn replica_gauges() -> [&'static IntGaugeVec; 6] {
    [
        &REPLICA_RUNNING,
        &REPLICA_WAITING,
        &REPLICA_FREE_SLOTS,
        &REPLICA_KV_USED_TOKENS,
        &REPLICA_KV_BUDGET_TOKENS,
        &REPLICA_PREFIX_CACHE_TOKENS,
    ]
}

fn replica_figures(report: &ReplicaCapacity, free_slots: u32) -> [u64; 6] {
    [
        report.running.into(),
        report.waiting.into(),
        free_slots.into(),
        report.kv_used_tokens,
        report.kv_budget_tokens,
        report.prefix_cache_tokens,
    ]
}

/// Shows a replica's report of `model`.
pub fn show_replica(model: &str, report: &ReplicaCapacity, free_slots: u32) {
    for (gauge, value) in replica_gauges().into_iter().zip(replica_figures(report, free_slots)) {
        gauge.with_label_values(&[model, &report.replica]).set(i64::try_from(value).unwrap_or(i64::MAX));
    }
}

/// Removes the series of a replica whose reports aged out.
pub fn forget_replica(model: &str, replica: &str) {
    for gauge in replica_gauges() {
        // Absent already (never shown by this process): nothing to remove.
        let _ = gauge.remove_label_values(&[model, replica]);
    }
}

/// Shows a model's drop and refusal counters at 0, so the first drop is an increase Prometheus
/// sees and the dashboard's series exist before anything is dropped.
pub fn show_model(model: &str) {
    let overloaded = DropReason::Overloaded { cause: Overload::QueueFull, retry_after: Duration::ZERO };
    for reason in [DropReason::Expired, DropReason::Cancelled, overloaded] {
        DROPPED.with_label_values(&[model, reason.as_str()]);
    }
    for cause in [Overload::QueueFull, Overload::DeadlineUnreachable] {
        REFUSED.with_label_values(&[model, cause.as_str()]);
    }
}
