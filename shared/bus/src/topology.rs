//! The mesh's streams and durable consumers, declared once and provisioned idempotently by
//! whichever service starts first (docs/architecture.md, "The stage graph").
//!
//! Every edge is its own stream with interest retention: a message stays until every consumer
//! declared on it has acked, so the stream's depth is the edge's backlog and its limits
//! (discard new) turn overload into a refusal at the publisher rather than unbounded memory.
//! All consumers of the whole mesh are declared here, not by the service that reads them, so a
//! message published before its reader first starts is kept, whatever the start-up order.
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    stream::{self, DiscardPolicy, RetentionPolicy},
};

use tracing::warn;

use crate::{BusError, BusSettings};

/// One edge of the stage graph: a stream and the subjects it captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    pub stream: &'static str,
    /// Subject prefix; keyed edges append `.<key>`.
    pub subject: &'static str,
    /// What the trailing `.<key>` of a subject names, if anything.
    pub key: EdgeKey,
}

/// What an edge's subjects are keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeKey {
    /// One subject for the whole edge.
    None,
    /// `.<request_id>`: a request's messages can be found by subject.
    Request,
    /// `.<model>`: each model's work can be read or counted apart.
    Model,
    /// `.<stage>`: the stage that wrote the message.
    Stage,
}

impl Edge {
    pub const QUERIES: Edge = Edge { stream: "MR_QUERIES", subject: "mr.v1.queries", key: EdgeKey::None };
    pub const CLEAN: Edge = Edge { stream: "MR_CLEAN", subject: "mr.v1.clean", key: EdgeKey::None };
    pub const ADMITTED: Edge = Edge { stream: "MR_ADMITTED", subject: "mr.v1.admitted", key: EdgeKey::None };
    pub const PROMPTS: Edge = Edge { stream: "MR_PROMPTS", subject: "mr.v1.prompts", key: EdgeKey::Model };
    pub const BATCHES: Edge = Edge { stream: "MR_BATCHES", subject: "mr.v1.batches", key: EdgeKey::Model };
    pub const COMPLETIONS: Edge = Edge { stream: "MR_COMPLETIONS", subject: "mr.v1.completions", key: EdgeKey::None };
    pub const RESULTS: Edge = Edge { stream: "MR_RESULTS", subject: "mr.v1.results", key: EdgeKey::Request };
    pub const DLQ: Edge = Edge { stream: "MR_DLQ", subject: "mr.v1.dlq", key: EdgeKey::Stage };

    pub const ALL: [Edge; 8] = [
        Self::QUERIES,
        Self::CLEAN,
        Self::ADMITTED,
        Self::PROMPTS,
        Self::BATCHES,
        Self::COMPLETIONS,
        Self::RESULTS,
        Self::DLQ,
    ];

    /// The subject to publish on; `key` (request id, model or stage) is ignored by unkeyed edges.
    pub fn subject_for(&self, key: &str) -> String {
        if self.key != EdgeKey::None { format!("{}.{key}", self.subject) } else { self.subject.to_owned() }
    }

    /// The key of one of this edge's subjects (`None` for another edge's or an unkeyed one).
    pub fn key_of<'s>(&self, subject: &'s str) -> Option<&'s str> {
        let key = subject.strip_prefix(self.subject)?.strip_prefix('.')?;
        (self.key != EdgeKey::None && !key.is_empty()).then_some(key)
    }

    /// The subject filter capturing the whole edge.
    pub fn filter(&self) -> String {
        if self.key != EdgeKey::None { format!("{}.>", self.subject) } else { self.subject.to_owned() }
    }
}

/// Core-NATS subjects for what needs no persistence.
pub mod ephemeral {
    /// Token stream of one request.
    pub fn tokens(request_id: &str) -> String {
        format!("mr.v1.tokens.{request_id}")
    }
    /// Cancellation of one request.
    pub fn cancel(request_id: &str) -> String {
        format!("mr.v1.cancel.{request_id}")
    }
    pub const CANCEL_ALL: &str = "mr.v1.cancel.*";
    /// Load reports of `model`'s inference replicas (`ReplicaCapacity`).
    pub fn capacity(model: &str) -> String {
        format!("mr.v1.capacity.{model}")
    }
    pub const CAPACITY_ALL: &str = "mr.v1.capacity.*";
}

/// A durable pull consumer: `durable` is named after the consuming service (and edge where a
/// service reads several).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub edge: Edge,
    pub durable: &'static str,
}

impl ConsumerSpec {
    pub const PREPROCESS: ConsumerSpec = ConsumerSpec { edge: Edge::QUERIES, durable: "preprocess" };
    pub const MODERATION_INPUT: ConsumerSpec = ConsumerSpec { edge: Edge::CLEAN, durable: "moderation-input" };
    pub const SESSION: ConsumerSpec = ConsumerSpec { edge: Edge::ADMITTED, durable: "session" };
    pub const BATCHER: ConsumerSpec = ConsumerSpec { edge: Edge::PROMPTS, durable: "batcher" };
    pub const INFERENCE: ConsumerSpec = ConsumerSpec { edge: Edge::BATCHES, durable: "inference" };
    pub const MODERATION_OUTPUT: ConsumerSpec = ConsumerSpec { edge: Edge::COMPLETIONS, durable: "moderation-output" };
    pub const SESSION_RESULTS: ConsumerSpec = ConsumerSpec { edge: Edge::RESULTS, durable: "session-results" };
    pub const SINK_RESULTS: ConsumerSpec = ConsumerSpec { edge: Edge::RESULTS, durable: "sink-results" };
    pub const SINK_DLQ: ConsumerSpec = ConsumerSpec { edge: Edge::DLQ, durable: "sink-dlq" };

    pub const ALL: [ConsumerSpec; 9] = [
        Self::PREPROCESS,
        Self::MODERATION_INPUT,
        Self::SESSION,
        Self::BATCHER,
        Self::INFERENCE,
        Self::MODERATION_OUTPUT,
        Self::SESSION_RESULTS,
        Self::SINK_RESULTS,
        Self::SINK_DLQ,
    ];
}

/// The declared layout with its limits.
#[derive(Debug, Clone)]
pub struct Topology {
    pub streams: Vec<stream::Config>,
    pub consumers: Vec<(String, pull::Config)>,
}

impl Topology {
    /// The whole mesh under the given settings.
    pub fn mesh(settings: &BusSettings) -> Self {
        Self::new(settings, &Edge::ALL, &ConsumerSpec::ALL)
    }

    pub fn new(settings: &BusSettings, edges: &[Edge], consumers: &[ConsumerSpec]) -> Self {
        let streams = edges
            .iter()
            .map(|edge| stream::Config {
                name: edge.stream.to_owned(),
                subjects: vec![edge.filter()],
                retention: RetentionPolicy::Interest,
                discard: DiscardPolicy::New,
                max_messages: settings.stream_max_msgs,
                max_bytes: settings.stream_max_bytes,
                max_age: Duration::from_secs(settings.stream_max_age_s),
                storage: settings.storage(),
                duplicate_window: settings.duplicate_window(),
                allow_direct: true,
                num_replicas: settings.stream_replicas,
                ..Default::default()
            })
            .collect();
        let consumers = consumers
            .iter()
            .map(|spec| (spec.edge.stream.to_owned(), consumer_config(settings, spec.durable)))
            .collect();
        Self { streams, consumers }
    }

    /// Creates what is missing and brings what exists up to the declared config. Safe to run
    /// concurrently from several services: a lost creation race is resolved by updating.
    pub async fn provision(&self, js: &jetstream::Context) -> Result<(), BusError> {
        let js = &provisioning(js);
        for config in &self.streams {
            provision_stream(js, config).await?;
        }
        for (stream_name, config) in &self.consumers {
            provision_consumer(js, stream_name, config).await?;
        }
        Ok(())
    }
}

/// How long one provisioning request (creating or updating a stream, a bucket, a consumer)
/// waits for its answer. On a cluster each is a round of the JetStream meta group (and of the
/// new stream's own group); with seven services creating the mesh at once on a three-node
/// cluster some requests were never answered (the chaos suite's `cluster` schedule: two
/// services failed start-up with `jetstream request timed out` after 30 s while the others
/// had provisioned in 3 s), so an unanswered request is sent again, until
/// [`PROVISION_DEADLINE`].
pub const PROVISION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long provisioning keeps asking again when unanswered.
pub const PROVISION_DEADLINE: Duration = Duration::from_secs(120);

/// A JetStream context on `js`'s connection whose requests wait [`PROVISION_TIMEOUT`].
pub fn provisioning(js: &jetstream::Context) -> jetstream::Context {
    jetstream::ContextBuilder::new().timeout(PROVISION_TIMEOUT).build(js.client())
}

pub(crate) fn consumer_config(settings: &BusSettings, durable: &str) -> pull::Config {
    // Redelivery after a missed ack backs off: ack_wait, 2×, 4×, … (one entry per delivery).
    let backoff = settings.backoff();
    pull::Config {
        durable_name: Some(durable.to_owned()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait(),
        max_deliver: settings.max_deliver,
        max_ack_pending: settings.max_ack_pending,
        backoff,
        ..Default::default()
    }
}

async fn provision_stream(js: &jetstream::Context, config: &stream::Config) -> Result<(), BusError> {
    let what = || format!("stream {}", config.name);
    let deadline = Instant::now() + PROVISION_DEADLINE;
    loop {
        // What went unanswered this round (a refusal the server answered returns at once).
        let unanswered = match js.get_stream(&config.name).await {
            Ok(mut existing) => match existing.info().await {
                Ok(info) if stream_matches(&info.config, config) => return Ok(()),
                Ok(_) => match js.update_stream(config).await {
                    Ok(_) => return Ok(()),
                    Err(e) if refused(&e) => return Err(BusError::provision(what(), e)),
                    Err(e) => BusError::provision(what(), e),
                },
                Err(e) => BusError::provision(what(), e),
            },
            Err(_) => match js.create_stream(config.clone()).await {
                Ok(_) => return Ok(()),
                // Another service created it between our get and create: go round and update.
                Err(e) if is_name_taken(&e) => continue,
                Err(e) if refused(&e) => return Err(BusError::provision(what(), e)),
                Err(e) => BusError::provision(what(), e),
            },
        };
        if Instant::now() > deadline {
            return Err(unanswered);
        }
        warn!(stream = config.name, error = %unanswered, "provisioning: no answer yet, trying again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The server answered the create or update with an error (a conflicting config, a replica
/// count it cannot place): trying again would not help. Anything else (no answer in time, no
/// responders while a cluster elects its leader) is tried again until [`PROVISION_DEADLINE`].
fn refused(e: &jetstream::context::CreateStreamError) -> bool {
    matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(_))
}

/// The server's answer when a stream of that name exists already (by its JetStream error code).
fn is_name_taken(e: &jetstream::context::CreateStreamError) -> bool {
    matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(j) if j.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST)
}

fn stream_matches(have: &stream::Config, want: &stream::Config) -> bool {
    have.subjects == want.subjects
        && have.max_messages == want.max_messages
        && have.max_bytes == want.max_bytes
        && have.max_age == want.max_age
        && have.duplicate_window == want.duplicate_window
        && have.discard == want.discard
        && replicas(have) == replicas(want)
}

/// A stream's replica count as the server means it (0, "unset", is 1).
pub(crate) fn replicas(config: &stream::Config) -> usize {
    config.num_replicas.max(1)
}

async fn provision_consumer(js: &jetstream::Context, stream_name: &str, config: &pull::Config) -> Result<(), BusError> {
    let durable = config.durable_name.clone().unwrap_or_default();
    let what = || format!("consumer {stream_name}/{durable}");
    let stream = js.get_stream(stream_name).await.map_err(|e| BusError::provision(what(), e))?;
    // Only what is missing: an existing consumer belongs to the service that reads it, which
    // brings it to its own settings when it starts consuming (`StageConsumer::run`), so services
    // started with different flags do not take turns rewriting each other's consumers.
    if stream.consumer_info(&durable).await.is_err() {
        stream.create_consumer(config.clone()).await.map_err(|e| BusError::provision(what(), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_consumer_reads_a_declared_edge_and_names_are_unique() {
        let t = Topology::mesh(&BusSettings::default());
        let streams: Vec<_> = t.streams.iter().map(|s| s.name.as_str()).collect();
        let mut durables: Vec<_> = t.consumers.iter().map(|(_, c)| c.durable_name.clone().unwrap()).collect();
        for (stream, _) in &t.consumers {
            assert!(streams.contains(&stream.as_str()), "{stream} not declared");
        }
        durables.sort();
        durables.dedup();
        assert_eq!(durables.len(), t.consumers.len());
    }

    #[test]
    fn keyed_edges_capture_their_keyed_subjects() {
        assert_eq!(Edge::RESULTS.subject_for("r1"), "mr.v1.results.r1");
        assert_eq!(Edge::RESULTS.filter(), "mr.v1.results.>");
        assert_eq!(Edge::QUERIES.subject_for("ignored"), "mr.v1.queries");
        assert_eq!(Edge::RESULTS.key_of("mr.v1.results.r1"), Some("r1"));
        assert_eq!(Edge::RESULTS.key_of("mr.v1.resultsx.r1"), None);
        assert_eq!(Edge::RESULTS.key_of("mr.v1.results."), None);
        assert_eq!(Edge::RESULTS.key_of("mr.v1.queries"), None);
    }

    #[test]
    fn backoff_has_one_step_per_delivery() {
        let s = BusSettings { max_deliver: 4, ack_wait_s: 2, ..Default::default() };
        let c = consumer_config(&s, "x");
        assert_eq!(c.backoff, [2, 4, 8, 16].map(Duration::from_secs));
    }
}
