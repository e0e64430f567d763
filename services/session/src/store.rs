//! Conversations in a JetStream key-value bucket, changed only by compare-and-set.
//!
//! - **Bucket** (`MR_SESSIONS` by default): created or brought up to this process's flags at
//!   start-up (idempotent; with replicas started under different flags the last one's TTL
//!   wins), with `--stream-replicas` replicas like every stream of the mesh. One value per
//!   conversation (`history = 1`), keyed by [`SessionId::key`].
//! - **Idle expiry**: the bucket's `max_age` is the idle TTL. Every write (a prompt's pending
//!   turn, a stored exchange, a dropped pending turn) writes a new revision, which restarts the
//!   key's age: a conversation untouched for the TTL disappears, and the next query starts
//!   fresh. Reads do not refresh it.
//! - **Compare-and-set**: a change reads the key (value + revision), applies a pure transition
//!   ([`crate::state`]) and writes with "expected last revision" = the revision it read. If
//!   another writer (the other consumer, another replica) got in between, the write is refused,
//!   and the change starts again from a fresh read after a short, jittered, exponentially
//!   growing pause — at most `attempts` times, then the caller hands the message back (nak)
//!   and it is redelivered. No turn is lost and none is applied twice (the transitions are
//!   idempotent per request id).
//! - **Forget**: `purge` removes every revision of the key at once.
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use millrace_proto::now_unix_ms;
use tracing::{debug, warn};

use crate::key::SessionId;
use crate::metrics;
use crate::state::Conversation;

/// A key's latest revision; `value` is `None` when the key is absent, deleted or purged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Option<Bytes>,
    /// 0 when the key has no revision at all.
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The key changed since the revision the write expected.
    #[error("revision conflict")]
    Conflict,
    #[error("key-value store: {0}")]
    Unavailable(String),
}

/// What the store needs from a key-value bucket.
pub trait KvBackend: Send + Sync + 'static {
    fn read(&self, key: &str) -> impl Future<Output = Result<Versioned, KvError>> + Send;
    /// Writes if the key's latest revision is `revision` (0: the key has none); the new revision.
    fn write(&self, key: &str, value: Bytes, revision: u64) -> impl Future<Output = Result<u64, KvError>> + Send;
    fn purge(&self, key: &str) -> impl Future<Output = Result<(), KvError>> + Send;
}

/// The JetStream bucket.
#[derive(Clone)]
pub struct NatsKv {
    store: kv::Store,
}

impl NatsKv {
    /// Creates the bucket, or brings an existing one to this TTL, storage and replica count
    /// (`--stream-replicas`: on a cluster, a conversation survives the loss of a node).
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        idle_ttl: Duration,
        storage: jetstream::stream::StorageType,
        replicas: usize,
    ) -> Result<Self, KvError> {
        let config = kv::Config {
            bucket: bucket.to_owned(),
            description: "Millrace conversations: last turns per (tenant, user, session); idle TTL".to_owned(),
            history: 1,
            max_age: idle_ttl,
            storage,
            num_replicas: replicas,
            ..Default::default()
        };
        // Replicas starting together may race to create it: the loser goes round and updates.
        // Created with the provisioning timeout (a cluster's meta group can be slow to answer),
        // then opened on `js`, whose timeout its reads and writes keep.
        let provisioning = millrace_bus::topology::provisioning(js);
        let mut attempt = 0;
        loop {
            let created = match provisioning.create_or_update_key_value(config.clone()).await {
                Ok(_) => js.get_key_value(bucket).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match created {
                Ok(store) => return Ok(Self { store }),
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    warn!(bucket, error = %e, attempt, "creating the bucket: retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(KvError::Unavailable(format!("bucket {bucket}: {e}"))),
            }
        }
    }
}

impl KvBackend for NatsKv {
    async fn read(&self, key: &str) -> Result<Versioned, KvError> {
        let entry = self.store.entry(key).await.map_err(|e| KvError::Unavailable(format!("read: {e}")))?;
        Ok(match entry {
            None => Versioned { value: None, revision: 0 },
            Some(e) if e.operation == kv::Operation::Put => Versioned { value: Some(e.value), revision: e.revision },
            // A delete or purge marker: no value, but writes must expect its revision.
            Some(e) => Versioned { value: None, revision: e.revision },
        })
    }

    async fn write(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, KvError> {
        self.store.update(key, value, revision).await.map_err(|e| match e.kind() {
            kv::UpdateErrorKind::WrongLastRevision => KvError::Conflict,
            _ => KvError::Unavailable(format!("write: {e}")),
        })
    }

    async fn purge(&self, key: &str) -> Result<(), KvError> {
        self.store.purge(key).await.map_err(|e| KvError::Unavailable(format!("purge: {e}")))
    }
}

/// How compare-and-set retries after a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasRetry {
    /// Writes tried per change before giving up.
    pub attempts: u32,
    /// The pause before the first retry is drawn from `[0, base]`, doubling per retry…
    pub base: Duration,
    /// …up to `[0, max]`.
    pub max: Duration,
}

impl Default for CasRetry {
    fn default() -> Self {
        Self { attempts: 16, base: Duration::from_millis(2), max: Duration::from_millis(100) }
    }
}

impl CasRetry {
    /// The pause after the `retry`-th conflict (0-based): "full jitter".
    pub fn pause(&self, retry: u32) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << retry.min(16)).min(self.max);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Kv(#[from] KvError),
    /// Every attempt lost its race.
    #[error("gave up after {0} conflicting writes")]
    Contended(u32),
}

/// A conversation as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// `None`: no such conversation (never started, expired or forgotten).
    pub conversation: Option<Conversation>,
    pub revision: u64,
}

/// The outcome of [`SessionStore::modify`].
#[derive(Debug)]
pub struct Modified<T> {
    /// What the transition returned (on the attempt that won).
    pub outcome: T,
    /// The conversation as it now stands (written, or read unchanged).
    pub conversation: Conversation,
    pub revision: u64,
    pub written: bool,
    /// Conflicts lost before that.
    pub conflicts: u32,
}

pub struct SessionStore<B> {
    backend: B,
    retry: CasRetry,
}

impl<B: KvBackend> SessionStore<B> {
    pub fn new(backend: B, retry: CasRetry) -> Self {
        Self { backend, retry }
    }

    pub async fn load(&self, id: &SessionId) -> Result<Loaded, StoreError> {
        let v = self.backend.read(&id.key()).await?;
        Ok(Loaded { conversation: v.value.map(|bytes| decode(id, &bytes)), revision: v.revision })
    }

    /// Applies `change` to the conversation by compare-and-set (see the module docs).
    /// `change` gets the conversation as read (empty when absent) and returns whether it
    /// changed it; an unchanged conversation is not written (so an absent one is not created).
    /// It may run several times, each time on a fresh read.
    pub async fn modify<T>(
        &self,
        id: &SessionId,
        mut change: impl FnMut(&mut Conversation) -> (bool, T) + Send,
    ) -> Result<Modified<T>, StoreError> {
        let key = id.key();
        let mut conflicts = 0;
        loop {
            let read = self.backend.read(&key).await?;
            let mut conversation = read.value.map(|bytes| decode(id, &bytes)).unwrap_or_default();
            let (changed, outcome) = change(&mut conversation);
            if !changed {
                return Ok(Modified { outcome, conversation, revision: read.revision, written: false, conflicts });
            }
            conversation.updated_unix_ms = now_unix_ms();
            match self.backend.write(&key, conversation.to_json().into(), read.revision).await {
                Ok(revision) => return Ok(Modified { outcome, conversation, revision, written: true, conflicts }),
                Err(KvError::Conflict) => {
                    conflicts += 1;
                    metrics::CAS_CONFLICTS.inc();
                    if conflicts >= self.retry.attempts {
                        return Err(StoreError::Contended(conflicts));
                    }
                    let pause = self.retry.pause(conflicts - 1);
                    debug!(key, conflicts, ?pause, "compare-and-set conflict: retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Forgets the conversation; whether there was one.
    pub async fn forget(&self, id: &SessionId) -> Result<bool, StoreError> {
        let key = id.key();
        let existed = self.backend.read(&key).await?.value.is_some();
        self.backend.purge(&key).await?;
        Ok(existed)
    }
}

/// A value that does not decode (written by something else, or corrupted) would block its
/// conversation until it expires: it is read as an empty conversation and overwritten.
fn decode(id: &SessionId, bytes: &[u8]) -> Conversation {
    Conversation::from_json(bytes).unwrap_or_else(|e| {
        warn!(key = id.key(), error = %e, "undecodable conversation: starting it afresh");
        Conversation::default()
    })
}

/// An in-memory bucket with the same compare-and-set rules, for unit tests.
#[cfg(test)]
pub mod memory {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Default)]
    pub struct MemoryKv {
        /// key → (value or tombstone, revision)
        keys: Mutex<HashMap<String, (Option<Bytes>, u64)>>,
        sequence: Mutex<u64>,
        /// The next this many writes are refused as conflicts after a rival write lands.
        pub rival_writes: AtomicU32,
    }

    impl MemoryKv {
        fn next(&self) -> u64 {
            let mut s = self.sequence.lock().unwrap();
            *s += 1;
            *s
        }
    }

    impl KvBackend for MemoryKv {
        async fn read(&self, key: &str) -> Result<Versioned, KvError> {
            // Let rivals run between a read and its write, as a network would.
            tokio::task::yield_now().await;
            let keys = self.keys.lock().unwrap();
            Ok(keys
                .get(key)
                .map_or(Versioned { value: None, revision: 0 }, |(v, r)| Versioned { value: v.clone(), revision: *r }))
        }

        async fn write(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, KvError> {
            if self.rival_writes.load(Ordering::SeqCst) > 0 {
                self.rival_writes.fetch_sub(1, Ordering::SeqCst);
                let rev = self.next();
                let mut keys = self.keys.lock().unwrap();
                let entry = keys.entry(key.to_owned()).or_insert((None, 0));
                entry.1 = rev;
                return Err(KvError::Conflict);
            }
            let rev = self.next();
            let mut keys = self.keys.lock().unwrap();
            let current = keys.get(key).map_or(0, |(_, r)| *r);
            if current != revision {
                return Err(KvError::Conflict);
            }
            keys.insert(key.to_owned(), (Some(value), rev));
            Ok(rev)
        }

        async fn purge(&self, key: &str) -> Result<(), KvError> {
            let rev = self.next();
            self.keys.lock().unwrap().insert(key.to_owned(), (None, rev));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::memory::MemoryKv;
    use super::*;
    use crate::state::{Begin, Completion};

    fn fast() -> CasRetry {
        CasRetry { attempts: 5, base: Duration::from_micros(10), max: Duration::from_micros(100) }
    }

    fn id() -> SessionId {
        SessionId::new("t", "alice", "s")
    }

    #[tokio::test]
    async fn an_unchanged_absent_conversation_is_not_created() {
        let store = SessionStore::new(MemoryKv::default(), fast());
        let m = store.modify(&id(), |c| (c.abandon("r1"), ())).await.unwrap();
        assert!(!m.written);
        assert_eq!(store.load(&id()).await.unwrap(), Loaded { conversation: None, revision: 0 });
    }

    #[tokio::test]
    async fn a_lost_race_is_retried_on_a_fresh_read() {
        let store = SessionStore::new(MemoryKv::default(), fast());
        store.modify(&id(), |c| (c.begin("r1", "hi", "m", 0) == Begin::Added, ())).await.unwrap();
        store.backend.rival_writes.store(2, Ordering::SeqCst);
        let mut runs = 0;
        let m = store
            .modify(&id(), |c| {
                runs += 1;
                (matches!(c.complete("r1", "a", 10, 1), Completion::Stored { .. }), ())
            })
            .await
            .unwrap();
        assert_eq!((m.written, m.conflicts, runs), (true, 2, 3));
        let loaded = store.load(&id()).await.unwrap();
        assert_eq!(loaded.revision, m.revision);
        assert_eq!(loaded.conversation.unwrap().exchanges.len(), 1);
    }

    #[tokio::test]
    async fn endless_contention_gives_up_after_the_bound() {
        let store = SessionStore::new(MemoryKv::default(), fast());
        store.backend.rival_writes.store(100, Ordering::SeqCst);
        let e = store.modify(&id(), |c| (c.begin("r1", "hi", "m", 0) == Begin::Added, ())).await.unwrap_err();
        assert!(matches!(e, StoreError::Contended(5)), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_lose_nothing() {
        let store = Arc::new(SessionStore::new(
            MemoryKv::default(),
            CasRetry { attempts: 1000, base: Duration::from_micros(50), max: Duration::from_millis(1) },
        ));
        for i in 0..40 {
            store
                .modify(&id(), |c| (c.begin(&format!("r{i}"), &format!("q{i}"), "m", 0) == Begin::Added, ()))
                .await
                .unwrap();
        }
        let tasks: Vec<_> = (0..40)
            .rev()
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .modify(&id(), |c| {
                            (
                                matches!(
                                    c.complete(&format!("r{i}"), &format!("a{i}"), 100, 0),
                                    Completion::Stored { .. }
                                ),
                                (),
                            )
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let c = store.load(&id()).await.unwrap().conversation.unwrap();
        let order: Vec<String> = c.exchanges.iter().map(|e| e.request_id.clone()).collect();
        assert_eq!(order, (0..40).map(|i| format!("r{i}")).collect::<Vec<_>>());
        assert!(c.pending.is_empty());
    }

    #[tokio::test]
    async fn forget_removes_and_reports() {
        let store = SessionStore::new(MemoryKv::default(), fast());
        assert!(!store.forget(&id()).await.unwrap());
        store.modify(&id(), |c| (c.begin("r1", "hi", "m", 0) == Begin::Added, ())).await.unwrap();
        assert!(store.forget(&id()).await.unwrap());
        let loaded = store.load(&id()).await.unwrap();
        assert!(loaded.conversation.is_none());
        // Writing after a purge expects the tombstone's revision.
        let m = store.modify(&id(), |c| (c.begin("r2", "hi", "m", 0) == Begin::Added, ())).await.unwrap();
        assert!(m.written && m.revision > loaded.revision);
    }

    #[test]
    fn pauses_are_jittered_and_bounded() {
        let r = CasRetry { attempts: 10, base: Duration::from_millis(2), max: Duration::from_millis(100) };
        for retry in 0..40 {
            let ceiling = Duration::from_millis(2 << retry.min(10)).min(Duration::from_millis(100));
            assert!(r.pause(retry) <= ceiling);
        }
    }
}
