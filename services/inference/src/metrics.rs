//! Inference's Prometheus metrics, in the process-wide default registry that the admin server's
//! `/metrics` exposes.
use std::sync::LazyLock;

use prometheus::{IntCounterVec, register_int_counter_vec};

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
