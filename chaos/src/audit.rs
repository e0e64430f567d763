//! Counting what the mesh stored, per request id, on the edges whose duplicates are effects:
//! queries (`MR_QUERIES`), completions (`MR_COMPLETIONS`) and results (`MR_RESULTS`).
//!
//! Those streams use interest retention: a message is deleted once its consumers acked it, so
//! at the end of a run they hold almost nothing. A limits-retention stream *sourcing* them does
//! not see everything: tried on nats-server 2.15.1, it missed each origin's first message, and
//! after a broker restart sourcing from MR_COMPLETIONS and MR_RESULTS never resumed (the
//! server logs "Sourcing state is outdated"): the acknowledged messages were gone before the
//! source consumer came back. So the suite reads them itself, through a durable explicit-ack
//! consumer of its own on each (`chaos-audit`), created before the load: being a consumer, it
//! is interest, so nothing is deleted before the suite has counted it, across broker restarts
//! too (the consumer is durable and file-stored). It acks at once, so the streams' depth hardly
//! changes.
//!
//! Whether the count is complete is checked, not assumed: a stream's sequence numbers count the
//! messages it ever stored, so every sequence from the first after the consumer's creation up
//! to the origin's last must have been read (a redelivery of one already read counts once).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use millrace_bus::topology::Edge;
use millrace_proto::Message;
use millrace_proto::v1::{Completion, Query, Result as TerminalResult};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// The suite's durable consumer on each origin.
pub const DURABLE: &str = "chaos-audit";
/// The origins, in the order the report lists them.
pub const SOURCES: [Edge; 3] = [Edge::QUERIES, Edge::COMPLETIONS, Edge::RESULTS];

/// The readers and what they have counted.
pub struct Audit {
    baseline: BTreeMap<String, u64>,
    state: Arc<Mutex<BTreeMap<String, Reading>>>,
    stop: CancellationToken,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

/// What has been read from one origin.
#[derive(Default)]
struct Reading {
    sequences: BTreeSet<u64>,
    redelivered: u64,
    undecodable: u64,
    per_request: HashMap<String, u32>,
}

/// What one origin's messages add up to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OriginCount {
    /// Messages the origin stored during the run (its sequence numbers since the baseline).
    pub stored: u64,
    /// Of those, how many the suite read.
    pub read: u64,
    /// Origin sequences never read (the first few).
    pub missing_sequences: Vec<u64>,
    /// Deliveries of a message already read (the suite's own ack lost or late).
    pub redelivered: u64,
    /// Messages that do not decode (the injected poison).
    pub undecodable: u64,
    /// Messages per request id.
    #[serde(skip)]
    pub per_request: HashMap<String, u32>,
}

impl OriginCount {
    pub fn complete(&self) -> bool {
        self.missing_sequences.is_empty() && self.read == self.stored
    }

    /// Request ids stored more than once, with their count.
    pub fn duplicated(&self) -> BTreeMap<String, u32> {
        self.per_request.iter().filter(|(_, n)| **n > 1).map(|(id, n)| (id.clone(), *n)).collect()
    }
}

impl Audit {
    /// Creates the consumers (after the mesh provisioned its streams, before any load) and
    /// starts reading.
    pub async fn start(js: &jetstream::Context) -> anyhow::Result<Audit> {
        let mut baseline = BTreeMap::new();
        let state = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = CancellationToken::new();
        let mut readers = Vec::new();
        for edge in SOURCES {
            let origin = js.get_stream(edge.stream).await.with_context(|| format!("stream {}", edge.stream))?;
            let last = origin.get_info().await?.state.last_sequence;
            baseline.insert(edge.stream.to_owned(), last);
            let config = consumer::pull::Config {
                durable_name: Some(DURABLE.to_owned()),
                deliver_policy: if last == 0 {
                    consumer::DeliverPolicy::All
                } else {
                    consumer::DeliverPolicy::ByStartSequence { start_sequence: last + 1 }
                },
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(10),
                max_ack_pending: 100_000,
                ..Default::default()
            };
            let reader =
                origin.create_consumer(config).await.with_context(|| format!("consumer on {}", edge.stream))?;
            state.lock().expect("audit lock").insert(edge.stream.to_owned(), Reading::default());
            readers.push(tokio::spawn(read(edge.stream, reader, state.clone(), stop.clone())));
        }
        Ok(Audit { baseline, state, stop, readers })
    }

    /// Waits (up to `settle`) until every message the origins stored has been read, stops
    /// reading, and counts per origin.
    pub async fn count(
        self,
        js: &jetstream::Context,
        settle: Duration,
    ) -> anyhow::Result<BTreeMap<String, OriginCount>> {
        let mut last = BTreeMap::new();
        for edge in SOURCES {
            last.insert(
                edge.stream.to_owned(),
                js.get_stream(edge.stream).await?.get_info().await?.state.last_sequence,
            );
        }
        let deadline = tokio::time::Instant::now() + settle;
        loop {
            let caught_up = {
                let state = self.state.lock().expect("audit lock");
                last.iter().all(|(origin, last)| {
                    state[origin].sequences.range(self.baseline[origin] + 1..=*last).count() as u64
                        == last - self.baseline[origin]
                })
            };
            if caught_up || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.stop.cancel();
        for reader in self.readers {
            let _ = reader.await;
        }
        let mut state = self.state.lock().expect("audit lock");
        let mut counts = BTreeMap::new();
        for (origin, last) in last {
            let reading = state.remove(&origin).unwrap_or_default();
            let first = self.baseline[&origin] + 1;
            let stored = (last + 1).saturating_sub(first);
            counts.insert(
                origin,
                OriginCount {
                    stored,
                    read: reading.sequences.range(first..=last).count() as u64,
                    missing_sequences: (first..=last).filter(|s| !reading.sequences.contains(s)).take(20).collect(),
                    redelivered: reading.redelivered,
                    undecodable: reading.undecodable,
                    per_request: reading.per_request,
                },
            );
        }
        Ok(counts)
    }
}

/// Reads `origin` through its consumer until stopped, acking each message once counted; across
/// a broker restart it keeps asking.
async fn read(
    origin: &'static str,
    reader: consumer::Consumer<consumer::pull::Config>,
    state: Arc<Mutex<BTreeMap<String, Reading>>>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let batch = reader.fetch().max_messages(500).expires(Duration::from_millis(500)).messages().await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        while let Some(message) = batch.next().await {
            let Ok(message) = message else { break };
            let Ok(sequence) = message.info().map(|i| i.stream_sequence) else { continue };
            {
                let mut state = state.lock().expect("audit lock");
                let reading = state.get_mut(origin).expect("a reading per origin");
                if reading.sequences.insert(sequence) {
                    match request_id(origin, &message.payload) {
                        Some(id) => *reading.per_request.entry(id).or_default() += 1,
                        None => reading.undecodable += 1,
                    }
                } else {
                    reading.redelivered += 1;
                }
            }
            let _ = message.ack().await;
        }
    }
}

/// The request id of a stored message of `origin`, from its payload's context.
fn request_id(origin: &str, payload: &[u8]) -> Option<String> {
    let ctx = if origin == Edge::QUERIES.stream {
        Query::decode(payload).ok()?.ctx
    } else if origin == Edge::COMPLETIONS.stream {
        Completion::decode(payload).ok()?.ctx
    } else {
        TerminalResult::decode(payload).ok()?.ctx
    };
    ctx.map(|c| c.request_id).filter(|id| !id.is_empty())
}
