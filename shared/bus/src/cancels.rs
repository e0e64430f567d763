//! Cancellation as every stage that holds work sees it: notices on `mr.v1.cancel.<request_id>`
//! (core NATS, no queue group: every replica hears every notice, since any of them may hold the
//! request), and the one memory of notices that arrive before their request does.
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::BusError;
use crate::topology::ephemeral;

/// Follows every request's cancel subject (`mr.v1.cancel.*`) until `shutdown`, calling
/// `on_cancel` with each request id. Core NATS, no queue group: every replica hears every
/// notice, since any of them may hold the request.
pub async fn follow_cancels<F, Fut>(
    client: async_nats::Client,
    shutdown: tokio_util::sync::CancellationToken,
    on_ready: impl Fn(),
    mut on_cancel: F,
) -> Result<(), BusError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut notices = client
        .subscribe(ephemeral::CANCEL_ALL)
        .await
        .map_err(|e| BusError::unavailable(format!("subscribe {}", ephemeral::CANCEL_ALL), e))?;
    let prefix = ephemeral::cancel("");
    tracing::info!(subject = ephemeral::CANCEL_ALL, "following cancellations");
    on_ready();
    loop {
        let notice = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            notice = notices.next() => notice,
        };
        let notice = notice.ok_or_else(|| BusError::gone("cancel subscription ended"))?;
        if let Some(request_id) = notice.subject.strip_prefix(prefix.as_str()) {
            tracing::debug!(request_id, "cancel notice");
            on_cancel(request_id.to_owned()).await;
        }
    }
}

/// Cancel notices, remembered for a while and bounded in count (oldest forgotten first), so a
/// notice that arrives before its request (still queued upstream, or in a stream) still applies
/// when the request does. Batcher and inference each keep one, sized by the same settings
/// (`--cancel-remember-s`, `--cancel-memory`).
#[derive(Debug)]
pub struct CancelMemory {
    remember: Duration,
    capacity: usize,
    at: HashMap<String, Instant>,
    /// Notices in arrival order; a request cancelled twice appears twice.
    order: VecDeque<(String, Instant)>,
}

impl CancelMemory {
    pub fn new(remember: Duration, capacity: usize) -> Self {
        Self { remember, capacity: capacity.max(1), at: HashMap::new(), order: VecDeque::new() }
    }

    /// Remembers a notice heard at `now`, forgetting the oldest past the time or count bound.
    pub fn remember(&mut self, request_id: &str, now: Instant) {
        self.at.insert(request_id.to_owned(), now);
        self.order.push_back((request_id.to_owned(), now));
        while let Some((id, at)) = self.order.front() {
            if self.order.len() <= self.capacity && now.saturating_duration_since(*at) < self.remember {
                break;
            }
            // Only the notice's latest arrival forgets it.
            if self.at.get(id) == Some(at) {
                self.at.remove(id);
            }
            self.order.pop_front();
        }
    }

    /// Whether a notice for `request_id` is remembered at `now`.
    pub fn contains(&self, request_id: &str, now: Instant) -> bool {
        self.at.get(request_id).is_some_and(|at| now.saturating_duration_since(*at) < self.remember)
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_are_bounded_in_count_and_time() {
        let t0 = Instant::now();
        let mut c = CancelMemory::new(Duration::from_secs(10), 3);
        for id in ["a", "b", "c", "d"] {
            c.remember(id, t0);
        }
        assert_eq!(c.len(), 3);
        assert!(!c.contains("a", t0) && c.contains("d", t0));
        assert!(!c.contains("d", t0 + Duration::from_secs(10)));
        c.remember("e", t0 + Duration::from_secs(11));
        assert_eq!(c.len(), 1, "expired notices are forgotten as new ones arrive");
    }

    #[test]
    fn a_repeated_notice_is_remembered_from_its_latest_arrival() {
        let t0 = Instant::now();
        let mut c = CancelMemory::new(Duration::from_secs(10), 3);
        for (i, id) in ["a", "b", "c", "b", "d"].into_iter().enumerate() {
            c.remember(id, t0 + Duration::from_millis(i as u64));
        }
        let now = t0 + Duration::from_millis(5);
        assert!(c.contains("b", now) && c.contains("d", now) && !c.contains("a", now));
    }
}
