//! The batcher's configuration: every flag also reads its `MILLRACE_…` env var.
use std::num::{NonZeroU64, NonZeroUsize};
use std::time::Duration;

use millrace_runtime::ShellArgs;

use crate::queue::Limits;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "batcher", about = "Millrace batcher: schedules PROMPTS into per-model BATCHES")]
pub struct BatcherConfig {
    /// Most requests in one batch.
    #[arg(long, env = "MILLRACE_MAX_BATCH_SIZE", default_value = "16")]
    pub max_batch_size: NonZeroUsize,
    /// Most prompt tokens in one batch (a single longer prompt goes alone).
    #[arg(long, env = "MILLRACE_MAX_BATCH_TOKENS", default_value = "4096")]
    pub max_batch_tokens: NonZeroU64,
    /// Fallback gate (a model with no live capacity report): longest a request waits for its
    /// batch to fill while the model is busy, milliseconds.
    #[arg(long, env = "MILLRACE_MAX_WAIT_MS", default_value_t = 20)]
    pub max_wait_ms: u64,
    /// Fallback gate: batches per model in flight (in BATCHES, not yet acked by inference)
    /// before the batcher holds the next one back.
    #[arg(long, env = "MILLRACE_MAX_IN_FLIGHT", default_value = "2")]
    pub max_in_flight: NonZeroUsize,
    /// Fallback gate: dispatch at once when the model has nothing in flight (false: fixed
    /// batching).
    #[arg(long, env = "MILLRACE_DISPATCH_WHEN_IDLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub dispatch_when_idle: bool,
    /// How often the batches left in BATCHES are counted per model (the in-flight count),
    /// milliseconds. A freed slot is seen at most this late.
    #[arg(long, env = "MILLRACE_IN_FLIGHT_POLL_MS", default_value = "20")]
    pub in_flight_poll_ms: NonZeroU64,
    /// Most requests queued per model; one more is refused at once (RATE_LIMITED `overloaded`,
    /// with a retry hint).
    #[arg(long, env = "MILLRACE_MAX_QUEUE", default_value = "4096")]
    pub max_queue: NonZeroUsize,
    /// New tokens expected of a request that sets no `max_new_tokens`: its cost, which fair
    /// share charges and wait estimates weigh, is its prompt tokens plus these (or plus its
    /// `max_new_tokens`).
    #[arg(long, env = "MILLRACE_EXPECTED_NEW_TOKENS", default_value_t = 64)]
    pub expected_new_tokens: u32,
    /// Test fault: abort the process right after the first batch's PubAck, before its members'
    /// messages are acked (as a crash there would).
    #[arg(long, env = "MILLRACE_FAULT_ABORT_AFTER_PUBLISH", hide = true)]
    pub fault_abort_after_publish: bool,
    #[command(flatten)]
    pub shell: ShellArgs,
}

impl BatcherConfig {
    pub const ADMIN_PORT: u16 = 9184;

    pub fn limits(&self) -> Limits {
        Limits {
            max_batch_size: self.max_batch_size.get(),
            max_batch_tokens: self.max_batch_tokens.get(),
            max_wait: Duration::from_millis(self.max_wait_ms),
            max_in_flight: self.max_in_flight.get(),
            dispatch_when_idle: self.dispatch_when_idle,
            max_queue: self.max_queue.get(),
        }
    }

    pub fn in_flight_poll(&self) -> Duration {
        Duration::from_millis(self.in_flight_poll_ms.get())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let c = BatcherConfig::parse_from(["batcher"]);
        assert_eq!(
            c.limits(),
            Limits {
                max_batch_size: 16,
                max_batch_tokens: 4096,
                max_wait: Duration::from_millis(20),
                max_in_flight: 2,
                dispatch_when_idle: true,
                max_queue: 4096,
            }
        );
        assert_eq!(c.in_flight_poll(), Duration::from_millis(20));
        assert_eq!(c.expected_new_tokens, 64);
        assert!(!c.fault_abort_after_publish);
        let c = BatcherConfig::parse_from([
            "batcher",
            "--max-batch-size=4",
            "--max-wait-ms=0",
            "--max-in-flight=1",
            "--max-queue=10",
            "--expected-new-tokens=0",
        ]);
        let limits = c.limits();
        assert_eq!(
            (limits.max_batch_size, limits.max_wait, limits.max_in_flight, limits.max_queue, c.expected_new_tokens),
            (4, Duration::ZERO, 1, 10, 0)
        );
        for bad in [
            "--max-batch-size=0",
            "--max-batch-tokens=0",
            "--max-in-flight=0",
            "--in-flight-poll-ms=0",
            "--max-queue=0",
            "--expected-new-tokens=-1",
        ] {
            assert!(BatcherConfig::try_parse_from(["batcher", bad]).is_err(), "{bad}");
        }
    }
}
