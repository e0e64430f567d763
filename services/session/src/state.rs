//! One conversation as stored in the KV bucket, and the pure transitions the two consumers make
//! on it.
//!
//! # Why a pending turn
//!
//! The user's text of a turn is known when its prompt is built (ADMITTED), but the terminal
//! `Result` that completes the turn carries only the rendered `prompt` and the `completion`,
//! not the raw user text (and recovering it from the rendered prompt would depend on the
//! template and break on a text that contains the template's markers). So building a prompt
//! records a **pending** turn — request id, user text, a sequence number — in the conversation,
//! and the terminal result for that request id resolves it:
//!
//! - `COMPLETED`: the pending turn is promoted to an [`Exchange`] (user text + the completion).
//! - any other status (blocked, rejected, expired, cancelled, failed): the pending turn is
//!   dropped. Blocked or failed turns are never remembered, and a prompt never shows another
//!   request's pending (unanswered) user text: history holds completed exchanges only.
//!
//! Exchanges are kept in **request order**: each pending turn takes the next sequence number
//! of the conversation when its prompt is built, and its exchange is inserted at that place
//! whichever result is processed first. So concurrent requests of one session, completing in
//! any order on any replica, leave the history in the order the session saw the requests.
//!
//! Every transition is idempotent per request id: a redelivered query finds its pending turn
//! (or its exchange) and adds nothing; a redelivered result finds its exchange (or no pending
//! turn) and changes nothing.
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Pending turns older than this are dropped when the conversation is next written: their
/// request ended long ago (every request carries a deadline) and its result was missed, e.g.
/// because the state was forgotten or had expired in between.
pub const PENDING_MAX_AGE: Duration = Duration::from_secs(15 * 60);
/// Most pending turns kept per conversation (the oldest go first).
pub const MAX_PENDING: usize = 64;

/// One completed turn: the user's text and the assistant's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    pub seq: u64,
    pub request_id: String,
    pub user: String,
    pub assistant: String,
    /// When the prompt was built (the user's turn).
    pub asked_unix_ms: i64,
    /// When the result was stored (the assistant's turn).
    pub answered_unix_ms: i64,
}

/// A user turn whose prompt was published and whose terminal result has not been seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub seq: u64,
    pub request_id: String,
    pub user_text: String,
    pub asked_unix_ms: i64,
}

/// The KV value of one conversation (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Conversation {
    /// The model of the latest request (its tokenizer sizes the turns for `Sessions.Get`).
    pub model: String,
    /// Completed turns in request order, at most `max_turns`.
    pub exchanges: Vec<Exchange>,
    /// User turns awaiting their result, in request order.
    pub pending: Vec<Pending>,
    /// The sequence number the next request takes.
    pub next_seq: u64,
    /// Last write, unix ms: the key expires `idle_ttl` after it.
    pub updated_unix_ms: i64,
}

/// What [`Conversation::begin`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// A pending turn was recorded.
    Added,
    /// The request is already pending (a redelivered query).
    AlreadyPending,
    /// The request already completed (a query redelivered after its result).
    AlreadyCompleted,
}

/// What [`Conversation::complete`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The exchange was stored; `dropped` old exchanges went past `max_turns`.
    Stored { dropped: usize },
    /// The exchange is already stored (a redelivered result).
    Duplicate,
    /// No pending turn for this request (forgotten, expired, or never a prompt of this session).
    NoPending,
}

impl Conversation {
    /// Records the pending user turn of `request_id` (see the module docs).
    pub fn begin(&mut self, request_id: &str, user_text: &str, model: &str, now_unix_ms: i64) -> Begin {
        if self.exchanges.iter().any(|e| e.request_id == request_id) {
            return Begin::AlreadyCompleted;
        }
        if self.pending.iter().any(|p| p.request_id == request_id) {
            return Begin::AlreadyPending;
        }
        self.prune_pending(now_unix_ms);
        if self.pending.len() >= MAX_PENDING {
            let excess = self.pending.len() + 1 - MAX_PENDING;
            self.pending.drain(..excess);
        }
        self.pending.push(Pending {
            seq: self.next_seq,
            request_id: request_id.to_owned(),
            user_text: user_text.to_owned(),
            asked_unix_ms: now_unix_ms,
        });
        self.next_seq += 1;
        self.model = model.to_owned();
        Begin::Added
    }

    /// Promotes the pending turn of `request_id` to an exchange answered by `completion`,
    /// keeping the last `max_turns` exchanges.
    pub fn complete(&mut self, request_id: &str, completion: &str, max_turns: usize, now_unix_ms: i64) -> Completion {
        if self.exchanges.iter().any(|e| e.request_id == request_id) {
            return Completion::Duplicate;
        }
        let Some(i) = self.pending.iter().position(|p| p.request_id == request_id) else {
            return Completion::NoPending;
        };
        let pending = self.pending.remove(i);
        let at = self.exchanges.partition_point(|e| e.seq < pending.seq);
        self.exchanges.insert(
            at,
            Exchange {
                seq: pending.seq,
                request_id: pending.request_id,
                user: pending.user_text,
                assistant: completion.to_owned(),
                asked_unix_ms: pending.asked_unix_ms,
                answered_unix_ms: now_unix_ms,
            },
        );
        let dropped = self.exchanges.len().saturating_sub(max_turns);
        self.exchanges.drain(..dropped);
        Completion::Stored { dropped }
    }

    /// Whether this request is pending or completed here (its query was handled before).
    pub fn knows(&self, request_id: &str) -> bool {
        self.pending.iter().any(|p| p.request_id == request_id)
            || self.exchanges.iter().any(|e| e.request_id == request_id)
    }

    /// Drops the pending turn of `request_id` (its request ended without a completion);
    /// whether there was one.
    pub fn abandon(&mut self, request_id: &str) -> bool {
        let before = self.pending.len();
        self.pending.retain(|p| p.request_id != request_id);
        self.pending.len() != before
    }

    /// The history a prompt for `request_id` builds on: the completed exchanges (its own
    /// excluded, should a redelivered query find it already answered).
    pub fn history(&self, request_id: &str) -> Vec<(String, String)> {
        self.exchanges
            .iter()
            .filter(|e| e.request_id != request_id)
            .map(|e| (e.user.clone(), e.assistant.clone()))
            .collect()
    }

    fn prune_pending(&mut self, now_unix_ms: i64) {
        let oldest = now_unix_ms - PENDING_MAX_AGE.as_millis() as i64;
        self.pending.retain(|p| p.asked_unix_ms >= oldest);
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a conversation always serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_is_remembered_only_once_completed() {
        let mut c = Conversation::default();
        assert_eq!(c.begin("r1", "hi", "m", 10), Begin::Added);
        assert!(c.history("r2").is_empty(), "a pending turn is not history");
        assert_eq!(c.complete("r1", "hello!", 10, 20), Completion::Stored { dropped: 0 });
        assert_eq!(c.history("r2"), [("hi".to_owned(), "hello!".to_owned())]);
        assert!(c.pending.is_empty());
        assert_eq!((c.exchanges[0].asked_unix_ms, c.exchanges[0].answered_unix_ms), (10, 20));
    }

    #[test]
    fn a_failed_or_blocked_turn_is_never_remembered() {
        let mut c = Conversation::default();
        c.begin("r1", "bad words", "m", 0);
        assert!(c.abandon("r1"));
        assert!(!c.abandon("r1"));
        assert_eq!(c.complete("r1", "late answer", 10, 1), Completion::NoPending);
        assert!(c.exchanges.is_empty() && c.pending.is_empty());
    }

    #[test]
    fn redeliveries_change_nothing() {
        let mut c = Conversation::default();
        c.begin("r1", "hi", "m", 0);
        assert_eq!(c.begin("r1", "hi", "m", 1), Begin::AlreadyPending);
        assert_eq!(c.pending.len(), 1);
        c.complete("r1", "a", 10, 2);
        let before = c.clone();
        assert_eq!(c.complete("r1", "a", 10, 3), Completion::Duplicate);
        assert_eq!(c.begin("r1", "hi", "m", 4), Begin::AlreadyCompleted);
        assert_eq!(c, before);
        assert!(c.history("r1").is_empty(), "a prompt never shows its own turn as history");
    }

    #[test]
    fn exchanges_keep_request_order_whatever_the_completion_order() {
        let mut c = Conversation::default();
        for i in 0..5 {
            c.begin(&format!("r{i}"), &format!("q{i}"), "m", i);
        }
        for i in [3, 0, 4, 1, 2] {
            assert_eq!(c.complete(&format!("r{i}"), &format!("a{i}"), 100, 10), Completion::Stored { dropped: 0 });
        }
        let order: Vec<&str> = c.exchanges.iter().map(|e| e.request_id.as_str()).collect();
        assert_eq!(order, ["r0", "r1", "r2", "r3", "r4"]);
        assert!(c.exchanges.iter().all(|e| e.user[1..] == e.assistant[1..]));
    }

    #[test]
    fn only_the_last_max_turns_are_kept_oldest_dropped_first() {
        let mut c = Conversation::default();
        for i in 0..5 {
            c.begin(&format!("r{i}"), "q", "m", 0);
            let dropped = if i >= 3 { 1 } else { 0 };
            assert_eq!(c.complete(&format!("r{i}"), "a", 3, 0), Completion::Stored { dropped });
        }
        let kept: Vec<&str> = c.exchanges.iter().map(|e| e.request_id.as_str()).collect();
        assert_eq!(kept, ["r2", "r3", "r4"]);
        // Its pending turn was promoted: a redelivered result of a dropped turn stays dropped.
        assert_eq!(c.complete("r0", "a", 3, 0), Completion::NoPending);
    }

    #[test]
    fn stale_and_excess_pending_turns_are_bounded() {
        let mut c = Conversation::default();
        c.begin("old", "q", "m", 0);
        let later = PENDING_MAX_AGE.as_millis() as i64 + 1;
        c.begin("new", "q", "m", later);
        assert_eq!(c.pending.iter().map(|p| p.request_id.as_str()).collect::<Vec<_>>(), ["new"]);
        for i in 0..MAX_PENDING + 5 {
            c.begin(&format!("r{i}"), "q", "m", later);
        }
        assert_eq!(c.pending.len(), MAX_PENDING);
        assert_eq!(c.pending.last().unwrap().request_id, format!("r{}", MAX_PENDING + 4));
    }

    #[test]
    fn json_round_trips_and_tolerates_missing_fields() {
        let mut c = Conversation::default();
        c.begin("r1", "hi \"there\"", "m", 5);
        c.complete("r1", "ok", 10, 6);
        c.begin("r2", "again", "m", 7);
        assert_eq!(Conversation::from_json(&c.to_json()).unwrap(), c);
        assert_eq!(Conversation::from_json(b"{}").unwrap(), Conversation::default());
        assert!(Conversation::from_json(b"not json").is_err());
    }
}
