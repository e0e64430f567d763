//! The shell's own Prometheus metrics, in the process-wide default registry that the admin
//! server's `/metrics` exposes. With the `prometheus` crate's `process` feature the registry also
//! carries the process collector (`process_start_time_seconds`, resident memory, CPU, open fds),
//! whose start time changes each time the orchestrator restarts a process that exited.
use std::sync::LazyLock;

use prometheus::{IntCounterVec, IntGauge, register_int_counter_vec, register_int_gauge};

/// What `/readyz` answers, as 1 (ready) or 0: an alert can tell a process that is up but not
/// serving (a child down, draining) from one that is not scraped at all.
pub static READY: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "millrace_ready",
        "1 while every supervised child is up and the process is not draining, else 0"
    )
    .expect("metric registers once")
});

/// Child restarts by the supervisor; too many within the window exit the process instead.
pub static SUPERVISOR_RESTARTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "millrace_supervisor_restarts_total",
        "Supervised children restarted after they failed, panicked or exited while they should be running",
        &["child"]
    )
    .expect("metric registers once")
});
