//! What is decided once per request and must survive any restart of the broker
//! (docs/architecture.md, "Decided once, durably").
//!
//! JetStream's duplicate window cannot carry these: after a restart the server rebuilds it only
//! from the messages still stored, and interest retention has deleted every acknowledged one,
//! so the ids of finished requests are forgotten. Two key-value buckets, written with
//! create-if-absent (a compare-and-set on "no revision yet"), hold them instead:
//!
//! - **`MR_IDEMPOTENCY`**: one key per request id that came with an `Idempotency-Key`, written
//!   by ingest once the request's query is durably on QUERIES. A submit whose id is there is a
//!   retry and publishes nothing. Kept for `--idempotency-retention-s` (a day by default).
//! - **`MR_OUTCOMES`**: the request's terminal `Result`, decided by the first stage that
//!   publishes one. The [`crate::Publisher`] decides every message bound for RESULTS here and
//!   publishes the decided result whatever it was handed, so every reader of RESULTS (sink,
//!   session, followers) sees the one outcome. Beside it, `<request_id>.completion` records
//!   that the request's completion is durably published, so a redelivered batch member is not
//!   generated again. Kept for `--outcome-retention-s` and bounded by `--outcome-max-bytes`,
//!   oldest decisions forgotten first.
//!
//! Both are file-backed streams (memory under `--stream-storage=memory`) with
//! `--stream-replicas` replicas, created or brought to the configured limits and replica count
//! by whichever service starts first.
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{CreateKeyValueErrorKind, CreateStreamErrorKind};
use async_nats::jetstream::{self, kv, stream::DiscardPolicy};
use bytes::Bytes;
use tracing::warn;

use crate::topology::PROVISION_DEADLINE;
use crate::{BusError, BusSettings};

pub const IDEMPOTENCY_BUCKET: &str = "MR_IDEMPOTENCY";
pub const OUTCOMES_BUCKET: &str = "MR_OUTCOMES";
/// Key suffix of the record that a request's completion is published.
const COMPLETION: &str = ".completion";

/// The outcome that counts for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The decided `Result`, encoded.
    pub payload: Bytes,
    /// This call decided it (otherwise an earlier one had, and `payload` is that one's).
    pub first: bool,
}

#[derive(Clone)]
pub struct Ledger {
    idempotency: kv::Store,
    outcomes: kv::Store,
}

impl Ledger {
    /// Opens both buckets, creating them or bringing them to `settings`.
    pub async fn open(js: &jetstream::Context, settings: &BusSettings) -> Result<Self, BusError> {
        let bucket = |name: &str, description: &str, max_age_s: u64, max_bytes: i64| kv::Config {
            bucket: name.to_owned(),
            description: description.to_owned(),
            history: 1,
            max_age: Duration::from_secs(max_age_s),
            max_bytes,
            storage: settings.storage(),
            num_replicas: settings.stream_replicas,
            ..Default::default()
        };
        let idempotency = open_bucket(
            js,
            bucket(
                IDEMPOTENCY_BUCKET,
                "Millrace: request ids accepted with an Idempotency-Key",
                settings.idempotency_retention_s,
                -1,
            ),
        )
        .await?;
        let outcomes = open_bucket(
            js,
            bucket(
                OUTCOMES_BUCKET,
                "Millrace: each request's decided terminal result",
                settings.outcome_retention_s,
                settings.outcome_max_bytes,
            ),
        )
        .await?;
        Ok(Self { idempotency, outcomes })
    }

    /// Whether a query with this id was accepted before (and is therefore a retry).
    pub async fn was_accepted(&self, request_id: &str) -> Result<bool, BusError> {
        Ok(self
            .idempotency
            .get(request_id)
            .await
            .map_err(|e| BusError::unavailable("reading an accepted key", e))?
            .is_some())
    }

    /// Records that the query with this id is durably accepted. Idempotent.
    pub async fn record_accepted(&self, request_id: &str) -> Result<(), BusError> {
        create_once(&self.idempotency, request_id, Bytes::new()).await.map(|_| ())
    }

    /// Decides the request's outcome: `proposed` (an encoded `Result`) if none is decided yet,
    /// otherwise the one decided before, which stands.
    pub async fn decide(&self, request_id: &str, proposed: Bytes) -> Result<Decision, BusError> {
        // A decision that expires between a lost create and the read is retried once.
        for _ in 0..2 {
            if create_once(&self.outcomes, request_id, proposed.clone()).await? {
                return Ok(Decision { payload: proposed, first: true });
            }
            if let Some(payload) = self.outcome(request_id).await? {
                return Ok(Decision { payload, first: false });
            }
        }
        Err(BusError::Other { context: format!("the outcome of {request_id} kept changing"), source: None })
    }

    /// The decided outcome (an encoded `Result`), if any.
    pub async fn outcome(&self, request_id: &str) -> Result<Option<Bytes>, BusError> {
        self.outcomes.get(request_id).await.map_err(|e| BusError::unavailable("reading an outcome", e))
    }

    /// Records that the request's completion is durably published.
    pub async fn record_completion(&self, request_id: &str) -> Result<(), BusError> {
        create_once(&self.outcomes, &format!("{request_id}{COMPLETION}"), Bytes::new()).await.map(|_| ())
    }

    /// Whether the request's completion is published already.
    pub async fn completion_published(&self, request_id: &str) -> Result<bool, BusError> {
        let key = format!("{request_id}{COMPLETION}");
        Ok(self.outcomes.get(key).await.map_err(|e| BusError::unavailable("reading a completion record", e))?.is_some())
    }
}

/// Creates `key` with `value` unless it exists: `true` when this call created it.
async fn create_once(store: &kv::Store, key: &str, value: Bytes) -> Result<bool, BusError> {
    match store.create(key, value).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(BusError::unavailable("writing the ledger", e)),
    }
}

/// Creates the bucket, or brings an existing one to this config's limits and replica count
/// (its storage stays what its creator chose, as with the edge streams); either way its stream
/// drops the oldest entries when full: forgetting the oldest decisions early beats refusing
/// every new one.
async fn open_bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, BusError> {
    // Created and updated with the provisioning timeout; the store is opened on `js`, whose
    // timeout its reads and writes keep.
    let (store_js, js) = (js, &crate::topology::provisioning(js));
    let name = config.bucket.clone();
    let what = || format!("bucket {name}");
    let deadline = Instant::now() + PROVISION_DEADLINE;
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Refused when the bucket exists (made by another service, maybe with other settings):
        // it is then found, and only its limits are brought to this config below.
        let created = js.create_key_value(config.clone()).await;
        let unanswered = match js.get_stream(format!("KV_{name}")).await {
            Ok(stream) => {
                let mut have = stream.cached_info().config.clone();
                have.num_replicas = have.num_replicas.max(1);
                let want = (config.max_age, config.max_bytes, DiscardPolicy::Old, config.num_replicas.max(1));
                let updated = if (have.max_age, have.max_bytes, have.discard, have.num_replicas) != want {
                    (have.max_age, have.max_bytes, have.discard, have.num_replicas) = want;
                    js.update_stream(&have).await.map(drop)
                } else {
                    Ok(())
                };
                match updated {
                    Ok(()) => match store_js.get_key_value(&name).await {
                        Ok(store) => return Ok(store),
                        Err(e) => BusError::provision(what(), e),
                    },
                    Err(e) if matches!(e.kind(), CreateStreamErrorKind::JetStream(_)) => {
                        return Err(BusError::provision(what(), e));
                    }
                    Err(e) => BusError::provision(what(), e),
                }
            }
            // Neither made nor there. The server refused to make it (a config it cannot hold,
            // such as more replicas than it has nodes): that is the reason. Otherwise NATS has
            // not answered (not ready yet, a cluster electing its leader): try again.
            Err(e) => match created {
                Err(refused) if server_refused(&refused) => {
                    return Err(BusError::provision(what(), refused));
                }
                Err(unanswered) => BusError::provision(what(), unanswered),
                Ok(_) => BusError::provision(what(), e),
            },
        };
        if Instant::now() > deadline {
            return Err(unanswered);
        }
        warn!(bucket = name, error = %unanswered, attempt, "opening the bucket: no answer yet, trying again");
        tokio::time::sleep(Duration::from_millis(100 * attempt.min(5))).await;
    }
}

/// The server answered the bucket's creation with an error (a config it cannot hold): asking
/// again would not help. A timeout, or JetStream not ready yet, is worth another try.
fn server_refused(e: &jetstream::context::CreateKeyValueError) -> bool {
    e.kind() == CreateKeyValueErrorKind::BucketCreate
        && std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<jetstream::context::CreateStreamError>())
            .is_some_and(|s| matches!(s.kind(), CreateStreamErrorKind::JetStream(_)))
}
