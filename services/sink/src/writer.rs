//! The batch writer: consumers hand it writes and wait; it commits whatever has gathered in
//! one transaction and then answers each of them, so every message is acked only after the
//! transaction holding its row has committed.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::store::{Store, Write};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the writer stopped before committing")]
    Stopped,
}

struct Pending {
    write: Write,
    done: oneshot::Sender<Result<bool, WriteError>>,
}

/// The consumers' side: cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Pending>,
}

/// The writer's side, kept across restarts of the writer child.
#[derive(Clone)]
pub struct WriteQueue {
    rx: Arc<Mutex<mpsc::Receiver<Pending>>>,
}

pub fn channel(capacity: usize) -> (Writer, WriteQueue) {
    let (tx, rx) = mpsc::channel(capacity);
    (Writer { tx }, WriteQueue { rx: Arc::new(Mutex::new(rx)) })
}

impl Writer {
    /// Queues the write and waits for its commit; `Ok(false)` when the request already had a
    /// terminal row.
    pub async fn write(&self, write: Write) -> Result<bool, WriteError> {
        let (done, committed) = oneshot::channel();
        self.tx.send(Pending { write, done }).await.map_err(|_| WriteError::Stopped)?;
        committed.await.map_err(|_| WriteError::Stopped)?
    }
}

/// Batch limits and test fault injection.
#[derive(Debug, Clone)]
pub struct BatchPolicy {
    pub max_rows: usize,
    /// After the first write arrives, how long to wait for more before committing.
    pub linger: Duration,
    /// Test fault: abort the process right before the first commit (as a crash would).
    pub abort_before_commit: bool,
}

/// Commits batches until `shutdown`; after it, keeps committing until no write has arrived for
/// a moment, so consumers draining their in-flight messages still get their commits.
pub async fn run(
    queue: WriteQueue,
    store: Store,
    policy: BatchPolicy,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut rx = queue.rx.lock().await;
    let quiet = Duration::from_millis(300);
    loop {
        let first = if shutdown.is_cancelled() {
            match tokio::time::timeout(quiet, rx.recv()).await {
                Ok(Some(p)) => p,
                _ => return Ok(()),
            }
        } else {
            tokio::select! {
                p = rx.recv() => match p { Some(p) => p, None => return Ok(()) },
                _ = shutdown.cancelled() => continue,
            }
        };
        let mut batch = vec![first];
        let linger = tokio::time::sleep(policy.linger);
        tokio::pin!(linger);
        while batch.len() < policy.max_rows {
            tokio::select! {
                biased;
                p = rx.recv() => match p { Some(p) => batch.push(p), None => break },
                _ = &mut linger => break,
            }
        }
        if policy.abort_before_commit {
            warn!(rows = batch.len(), "fault injection: aborting before commit");
            std::process::abort();
        }
        let writes: Vec<Write> = batch.iter().map(|p| p.write.clone()).collect();
        match store.commit(&writes).await {
            Ok(inserted) => {
                for (p, new) in batch.into_iter().zip(inserted) {
                    let _ = p.done.send(Ok(new));
                }
            }
            Err(e) => {
                warn!(error = %e, rows = writes.len(), "commit failed; the messages will be redelivered");
                for p in batch {
                    let _ = p.done.send(Err(WriteError::Commit(e.to_string())));
                }
            }
        }
    }
}
