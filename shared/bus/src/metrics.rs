//! Prometheus metrics of the bus, registered in the process-wide default registry that the
//! admin server's `/metrics` exposes.
use std::sync::LazyLock;

use prometheus::{
    HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, register_histogram_vec, register_int_counter,
    register_int_counter_vec, register_int_gauge_vec,
};

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register_int_counter_vec!(name, help, labels).expect("metric registers once")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register_int_gauge_vec!(name, help, labels).expect("metric registers once")
}

fn histogram(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    // 100 µs … ~26 s: a relay hop and a long generation both land in a useful bucket.
    let buckets = prometheus::exponential_buckets(0.0001, 2.0, 19).expect("valid buckets");
    register_histogram_vec!(name, help, labels, buckets).expect("metric registers once")
}

pub static MESSAGES_IN: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter("millrace_messages_in_total", "Messages delivered to a stage", &["stage"]));
pub static MESSAGES_OUT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter("millrace_messages_out_total", "Messages published and acknowledged by the stream", &["stream"])
});
pub static DUPLICATES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "millrace_publish_duplicates_total",
        "Publishes the stream dropped as duplicates (same Nats-Msg-Id)",
        &["stream"],
    )
});
pub static PUBLISH_ERRORS: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter("millrace_publish_errors_total", "Publishes that failed", &["kind"]));
pub static ACKS: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter("millrace_acks_total", "Messages acked after their effect", &["stage"]));
pub static NAKS: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter("millrace_naks_total", "Messages handed back for redelivery", &["stage"]));
pub static TERMS: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter("millrace_terms_total", "Messages terminated as poison", &["stage"]));
pub static REDELIVERIES: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter("millrace_redeliveries_total", "Deliveries that were not the first", &["stage"]));
pub static BACKPRESSURE_WAITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "millrace_backpressure_waits_total",
        "Times a stage held a message because the next edge's stream was full",
        &["stage"],
    )
});
pub static DLQ: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter("millrace_dlq_total", "Records written to the DLQ", &["stage", "reason"]));
pub static PUBLISH_LATENCY: LazyLock<HistogramVec> =
    LazyLock::new(|| histogram("millrace_publish_latency_seconds", "Publish to PubAck", &["stream"]));
pub static STAGE_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram("millrace_stage_latency_seconds", "Delivery to ack of one message in a stage", &["stage"])
});
pub static OUTCOMES_OVERRULED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "millrace_outcomes_overruled_total",
        "Terminal results proposed after the request's outcome was decided (the decided one was published instead)"
    )
    .expect("metric registers once")
});

/// A consumer's lag as JetStream last reported it ([`crate::lag`]); absent while unknown.
pub static CONSUMER_PENDING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "millrace_consumer_pending_messages",
        "Messages stored for a durable consumer and not yet delivered to it (JetStream num_pending)",
        &["stream", "consumer"],
    )
});
pub static CONSUMER_ACK_PENDING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "millrace_consumer_ack_pending_messages",
        "Messages delivered to a durable consumer and not yet acked (JetStream num_ack_pending)",
        &["stream", "consumer"],
    )
});

/// Shows a stage's series at zero from its start, so the first nak, term or dead letter is an
/// increase Prometheus sees (a series born at 1 has no increase) and every name is exported
/// before anything goes wrong. Dead letters of other reasons appear with their first record.
pub fn show_stage(stage: &str) {
    for counter in [&MESSAGES_IN, &ACKS, &NAKS, &TERMS, &REDELIVERIES, &BACKPRESSURE_WAITS] {
        counter.with_label_values(&[stage]);
    }
    DLQ.with_label_values(&[stage, crate::dlq::MAX_DELIVERIES]);
    STAGE_LATENCY.with_label_values(&[stage]);
}
