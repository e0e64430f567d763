//! The session's Prometheus metrics, in the process-wide default registry that the admin
//! server's `/metrics` exposes (next to the bus metrics).
use std::sync::LazyLock;

use prometheus::{IntCounter, IntCounterVec, register_int_counter, register_int_counter_vec};

fn counter(name: &str, help: &str) -> IntCounter {
    register_int_counter!(name, help).expect("metric registers once")
}

/// Prompts published, by model.
pub static PROMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("millrace_session_prompts_total", "Prompts built and published", &["model"])
        .expect("metric registers once")
});

/// History exchanges left out of prompts to fit the token budget.
pub static TURNS_TRIMMED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter("millrace_session_turns_trimmed_total", "History exchanges left out of a prompt for the token budget")
});

/// Exchanges stored on a COMPLETED result.
pub static TURNS_STORED: LazyLock<IntCounter> =
    LazyLock::new(|| counter("millrace_session_turns_stored_total", "Exchanges stored from COMPLETED results"));

/// Pending turns dropped because their request ended without a completion.
pub static TURNS_ABANDONED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter("millrace_session_turns_abandoned_total", "Pending user turns dropped on a non-COMPLETED result")
});

/// Requests refused by the per-user rate limit.
pub static RATE_LIMITED: LazyLock<IntCounter> =
    LazyLock::new(|| counter("millrace_session_rate_limited_total", "Requests refused by the per-user rate limit"));

/// Compare-and-set writes refused because the conversation changed since it was read.
pub static CAS_CONFLICTS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "millrace_session_cas_conflicts_total",
        "Conversation writes that lost a compare-and-set race (then retried)",
    )
});
