//! Inference's Prometheus metrics, in the process-wide default registry that the admin server's
//! `/metrics` exposes.
use std::sync::LazyLock;

use millrace_engine::Load;
use prometheus::{
    Histogram, IntCounter, IntCounterVec, IntGaugeVec, register_histogram, register_int_counter,
    register_int_counter_vec, register_int_gauge_vec,
};

/// Generations ended, by how (`eos`, `length`, `stop`, `deadline`, `cancelled`): shows, e.g.,
/// that a client's cancel reached the engine mid-generation.
pub static GENERATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "millrace_inference_generations_total",
        "Generations ended, by finish reason",
        &["finish"]
    )
    .expect("metric registers once")
});

/// Batch members not generated because their work was done before, by why
/// (`completion_published`, `outcome_decided`).
pub static SKIPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "millrace_inference_skipped_total",
        "Batch members not generated because their completion or outcome already existed",
        &["reason"]
    )
    .expect("metric registers once")
});

/// Scheduler steps' duration (prefill chunks and one decode pass).
pub static STEP_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "millrace_inference_step_seconds",
        "Duration of one scheduling step (prefill chunks and a decode pass)",
        vec![0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]
    )
    .expect("metric registers once")
});

/// Tokens by kind: `prefill` (prompt tokens computed), `decode` (generated), `prefix_reused`
/// (prompt tokens whose KV came from the prefix cache).
pub static TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("millrace_inference_tokens_total", "Tokens processed, by kind", &["kind"])
        .expect("metric registers once")
});

/// Sequences in each decode pass (tokens per step).
pub static DECODE_BATCH: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "millrace_inference_decode_batch",
        "Sequences in one decode pass",
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
    )
    .expect("metric registers once")
});

/// Sequences admitted to the running set, and admissions that found a cached prefix (their
/// ratio is the prefix hit rate).
pub static ADMITTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("millrace_inference_admitted_total", "Sequences admitted to the running set")
        .expect("metric registers once")
});
pub static PREFIX_HITS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("millrace_inference_prefix_hits_total", "Admissions that reused a cached prefix")
        .expect("metric registers once")
});

/// The scheduler's occupancy, by what (`running`, `waiting`, `max_running`, `kv_used_tokens`,
/// `kv_budget_tokens`, `prefix_cache_tokens`).
pub static LOAD: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("millrace_inference_load", "Scheduler occupancy", &["what"]).expect("metric registers once")
});

pub fn record_load(load: &Load) {
    for (what, value) in [
        ("running", load.running),
        ("waiting", load.waiting),
        ("max_running", load.max_running),
        ("kv_used_tokens", load.kv_used_tokens),
        ("kv_budget_tokens", load.kv_budget_tokens),
        ("prefix_cache_tokens", load.prefix_cache_tokens),
    ] {
        LOAD.with_label_values(&[what]).set(value as i64);
    }
}
