//! Consumer lag as Prometheus gauges, read by each service from JetStream for the durable
//! consumers it reads, so no NATS exporter is needed to see an edge back up:
//! `millrace_consumer_pending_messages` (stored, not yet delivered) and
//! `millrace_consumer_ack_pending_messages` (delivered, not yet acked), labelled `stream` and
//! `consumer`. Every replica of a service exports the same consumer's figures (aggregate with
//! `max by (stream, consumer)`).
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::metrics;
use crate::topology::ConsumerSpec;

/// How often the consumer's info is read: about a scrape interval, and cheap for the server
/// (one request per consumer and replica).
pub const LAG_POLL_PERIOD: Duration = Duration::from_secs(5);

/// Exports one consumer's lag while it lives: the figures are read at once and then every
/// period; dropped, it stops and removes its series, so a stopped consumer shows no stale lag.
pub struct LagExport {
    task: JoinHandle<()>,
    series: Arc<Series>,
}

/// One consumer's two series. `live` is held while a figure is set, so none lands after the
/// series were removed.
struct Series {
    labels: [&'static str; 2],
    live: Mutex<bool>,
}

impl Series {
    fn show(&self, pending: u64, ack_pending: usize) {
        if *self.live.lock().expect("lag series lock") {
            metrics::CONSUMER_PENDING.with_label_values(&self.labels).set(saturating_i64(pending));
            metrics::CONSUMER_ACK_PENDING.with_label_values(&self.labels).set(saturating_i64(ack_pending as u64));
        }
    }

    /// Removes the series: unknown is shown as absent, not as the last figure read.
    fn forget(&self) {
        // Absent already (never read, or forgotten after a failed read): nothing to remove.
        let _ = metrics::CONSUMER_PENDING.remove_label_values(&self.labels);
        let _ = metrics::CONSUMER_ACK_PENDING.remove_label_values(&self.labels);
    }

    fn stop(&self) {
        *self.live.lock().expect("lag series lock") = false;
        self.forget();
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl LagExport {
    /// Starts reading `consumer` (the durable of `spec`) every `period`.
    pub fn spawn(consumer: PullConsumer, spec: ConsumerSpec, period: Duration) -> Self {
        let series = Arc::new(Series { labels: [spec.edge.stream, spec.durable], live: Mutex::new(true) });
        let task = tokio::spawn(poll(consumer, series.clone(), period));
        Self { task, series }
    }
}

impl Drop for LagExport {
    fn drop(&mut self) {
        self.task.abort();
        self.series.stop();
    }
}

async fn poll(consumer: PullConsumer, series: Arc<Series>, period: Duration) {
    let [stream, durable] = series.labels;
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match consumer.get_info().await {
            Ok(info) => {
                if failing {
                    debug!(stream, consumer = durable, "consumer lag readable again");
                }
                failing = false;
                series.show(info.num_pending, info.num_ack_pending);
            }
            Err(e) => {
                // Once per outage: the consumer itself reports NATS being away.
                if !failing {
                    warn!(stream, consumer = durable, error = %e, "consumer lag not read; its series are removed until it is");
                }
                failing = true;
                series.forget();
            }
        }
    }
}
