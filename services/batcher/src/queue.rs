//! Per-model dynamic batching (pure: no NATS and no clock of its own — every call that needs
//! the time takes `now`, so tests drive it with plain `Instant` arithmetic).
//!
//! One queue per model. A queue dispatches a batch when, in this order of precedence (the first
//! that holds is the recorded reason):
//!
//! - **size**: `max_batch_size` requests are queued;
//! - **tokens**: the queued prompts fill the token budget — the batch formed reaches
//!   `max_batch_tokens`, or the next request would push it past it;
//! - **wait**: the oldest queued request has waited `max_wait`;
//! - **idle**: the model has no batch in flight, so waiting would only leave the model unused.
//!
//! …and only while the model has fewer than `max_in_flight` batches in flight: at the bound
//! nothing dispatches, requests keep gathering (so batches grow under load) and the first
//! trigger that holds when a slot frees sends the next batch.
//!
//! A batch takes requests highest `priority` first, in arrival order within a priority, up to
//! `max_batch_size` and `max_batch_tokens` (a single prompt over the budget goes alone rather
//! than never). It stops at the first request that does not fit instead of skipping to a
//! smaller one behind it, so order is never traded for packing. Priority is strict: under
//! sustained higher-priority load a lower priority waits (and may expire), as in Triton's
//! priority queue policy.
//!
//! Requests whose deadline has passed or that were cancelled never reach a batch: they are
//! refused on arrival, swept out at their deadline, removed when the cancel notice arrives,
//! and reported as [`Dropped`]. Cancel notices are remembered for a while ([`CancelMemory`]),
//! since one may arrive before its request does.
//!
//! ## What "in flight" means
//!
//! The batcher cannot see inference finish a batch, but the stream can: `BATCHES` keeps a
//! message until the `inference` consumer acks it, and inference acks a batch only after its
//! outputs are published (ack after effect). So the number of messages left on
//! `mr.v1.batches.<model>` *is* the number of that model's batches queued at or running in
//! inference — from every batcher replica, and from before a restart. The stage counts it
//! periodically and reports it here ([`Queues::observe`]); between two counts, the batches this
//! process dispatched since are added on top:
//!
//! `in_flight = observed + dispatched-not-yet-PubAcked + PubAcked-after-the-count-was-asked`
//!
//! A batch PubAcked while a count was under way is counted twice until the next count: the
//! error is on the safe side (a slot frees one count period late, never early). A busy
//! estimate after each dispatch was the alternative; it would bound the dispatch *rate*, not
//! what inference actually holds, and keep sending batches into a stalled inference.
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use millrace_bus::CancelMemory;
use std::time::{Duration, Instant};

/// The batching policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_batch_size: usize,
    pub max_batch_tokens: u64,
    pub max_wait: Duration,
    pub max_in_flight: usize,
    /// Dispatch at once when the model has nothing in flight. Off = classic fixed batching
    /// (size, tokens or wait only), kept for the batching benchmark's baseline.
    pub dispatch_when_idle: bool,
}

/// Why a batch was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DispatchReason {
    Size,
    Tokens,
    Wait,
    Idle,
}

impl DispatchReason {
    /// As recorded in `Batch.dispatch_reason` and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Size => "size",
            Self::Tokens => "tokens",
            Self::Wait => "wait",
            Self::Idle => "idle",
        }
    }
}

/// Why a request left the queue without a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Expired,
    Cancelled,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A request offered to a queue; `payload` is whatever the caller needs back with it.
#[derive(Debug)]
pub struct Request<T> {
    pub request_id: String,
    pub priority: i32,
    /// Position in the arrival order: the prompt's stream sequence. Workers hand prompts over
    /// concurrently, so the order they reach the queue is not the order they arrived in.
    pub sequence: u64,
    pub tokens: u32,
    /// `None`: no deadline.
    pub deadline: Option<Instant>,
    pub payload: T,
}

/// A request in a dispatched batch.
#[derive(Debug)]
pub struct Member<T> {
    pub request_id: String,
    pub priority: i32,
    pub tokens: u32,
    pub arrived: Instant,
    /// The request's payloads: one, or more when the same request was delivered again while
    /// it was queued (all of them are answered by this batch).
    pub payloads: Vec<T>,
}

#[derive(Debug)]
pub struct Batch<T> {
    pub model: String,
    pub reason: DispatchReason,
    pub tokens: u64,
    /// Highest priority first, arrival order within a priority.
    pub members: Vec<Member<T>>,
}

impl<T> Batch<T> {
    pub fn request_ids(&self) -> Vec<&str> {
        self.members.iter().map(|m| m.request_id.as_str()).collect()
    }
}

/// A request removed without a batch.
#[derive(Debug)]
pub struct Dropped<T> {
    pub model: String,
    pub request_id: String,
    pub reason: DropReason,
    /// When it arrived (`now` for one refused on arrival).
    pub arrived: Instant,
    pub payloads: Vec<T>,
}

/// What became of a pushed request.
#[derive(Debug)]
pub enum Admission<T> {
    /// Waiting for a batch.
    Queued,
    /// The same request id was already queued: the payload rides with it.
    Joined,
    /// Refused: already past its deadline, or cancelled before it arrived.
    Dropped(Dropped<T>),
}

/// What one [`Queues::poll`] produced.
#[derive(Debug)]
pub struct Cycle<T> {
    pub dropped: Vec<Dropped<T>>,
    pub batches: Vec<Batch<T>>,
}

/// Priority (highest first), stream sequence, then push order (unique).
type Key = (Reverse<i32>, u64, u64);

#[derive(Debug)]
struct Entry<T> {
    request_id: String,
    priority: i32,
    tokens: u32,
    deadline: Option<Instant>,
    arrived: Instant,
    payloads: Vec<T>,
}

/// A model's batches in flight (see the module docs).
#[derive(Debug, Default)]
struct InFlight {
    /// Messages left on the model's BATCHES subject at the last count.
    observed: usize,
    /// Dispatched, PubAck not yet in.
    unacked: usize,
    /// When the PubAcks arrived of batches the last count may not include.
    acked_since: Vec<Instant>,
}

impl InFlight {
    fn count(&self) -> usize {
        self.observed + self.unacked + self.acked_since.len()
    }
}

#[derive(Debug)]
struct ModelQueue<T> {
    /// Highest priority first, then arrival order.
    entries: BTreeMap<Key, Entry<T>>,
    index: HashMap<String, Key>,
    in_flight: InFlight,
}

impl<T> Default for ModelQueue<T> {
    fn default() -> Self {
        Self { entries: BTreeMap::new(), index: HashMap::new(), in_flight: InFlight::default() }
    }
}

impl<T> ModelQueue<T> {
    fn remove(&mut self, model: &str, key: Key, reason: DropReason) -> Dropped<T> {
        let e = self.entries.remove(&key).expect("indexed entries exist");
        self.index.remove(&e.request_id);
        Dropped { model: model.to_owned(), request_id: e.request_id, reason, arrived: e.arrived, payloads: e.payloads }
    }

    fn sweep(&mut self, model: &str, now: Instant) -> Vec<Dropped<T>> {
        let expired: Vec<Key> =
            self.entries.iter().filter(|(_, e)| e.deadline.is_some_and(|d| d <= now)).map(|(k, _)| *k).collect();
        expired.into_iter().map(|k| self.remove(model, k, DropReason::Expired)).collect()
    }

    fn oldest(&self) -> Option<Instant> {
        self.entries.values().map(|e| e.arrived).min()
    }

    /// How many of the first entries the next batch takes, and why it would go now (if it would).
    fn trigger(&self, limits: &Limits, now: Instant) -> Option<(usize, DispatchReason)> {
        if self.entries.is_empty() || self.in_flight.count() >= limits.max_in_flight {
            return None;
        }
        let (mut take, mut tokens, mut token_full) = (0usize, 0u64, false);
        for e in self.entries.values() {
            if take == limits.max_batch_size {
                break;
            }
            if take > 0 && tokens + u64::from(e.tokens) > limits.max_batch_tokens {
                token_full = true;
                break;
            }
            take += 1;
            tokens += u64::from(e.tokens);
        }
        let reason = if take == limits.max_batch_size {
            DispatchReason::Size
        } else if token_full || tokens >= limits.max_batch_tokens {
            DispatchReason::Tokens
        } else if self.oldest().is_some_and(|t| now.saturating_duration_since(t) >= limits.max_wait) {
            DispatchReason::Wait
        } else if limits.dispatch_when_idle && self.in_flight.count() == 0 {
            DispatchReason::Idle
        } else {
            return None;
        };
        Some((take, reason))
    }

    fn dispatch(&mut self, model: &str, limits: &Limits, now: Instant) -> Option<Batch<T>> {
        let (take, reason) = self.trigger(limits, now)?;
        let mut members = Vec::with_capacity(take);
        for _ in 0..take {
            let (_, e) = self.entries.pop_first().expect("counted entries exist");
            self.index.remove(&e.request_id);
            members.push(Member {
                request_id: e.request_id,
                priority: e.priority,
                tokens: e.tokens,
                arrived: e.arrived,
                payloads: e.payloads,
            });
        }
        self.in_flight.unacked += 1;
        let tokens = members.iter().map(|m| u64::from(m.tokens)).sum();
        Some(Batch { model: model.to_owned(), reason, tokens, members })
    }
}

/// Every model's queue, the in-flight ledger and the cancel notices.
#[derive(Debug)]
pub struct Queues<T> {
    limits: Limits,
    models: BTreeMap<String, ModelQueue<T>>,
    cancels: CancelMemory,
    next_seq: u64,
}

impl<T> Queues<T> {
    pub fn new(limits: Limits, cancels: CancelMemory) -> Self {
        let limits = Limits {
            max_batch_size: limits.max_batch_size.max(1),
            max_in_flight: limits.max_in_flight.max(1),
            max_batch_tokens: limits.max_batch_tokens.max(1),
            ..limits
        };
        Self { limits, models: BTreeMap::new(), cancels, next_seq: 0 }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Offers a request to `model`'s queue. Nothing dispatches here: call [`Self::poll`].
    pub fn push(&mut self, model: &str, request: Request<T>, now: Instant) -> Admission<T> {
        let refused = if self.cancels.contains(&request.request_id, now) {
            Some(DropReason::Cancelled)
        } else if request.deadline.is_some_and(|d| d <= now) {
            Some(DropReason::Expired)
        } else {
            None
        };
        if let Some(reason) = refused {
            return Admission::Dropped(Dropped {
                model: model.to_owned(),
                request_id: request.request_id,
                reason,
                arrived: now,
                payloads: vec![request.payload],
            });
        }
        let queue = self.models.entry(model.to_owned()).or_default();
        if let Some(key) = queue.index.get(&request.request_id) {
            queue.entries.get_mut(key).expect("indexed entries exist").payloads.push(request.payload);
            return Admission::Joined;
        }
        let key = (Reverse(request.priority), request.sequence, self.next_seq);
        self.next_seq += 1;
        queue.index.insert(request.request_id.clone(), key);
        queue.entries.insert(
            key,
            Entry {
                request_id: request.request_id,
                priority: request.priority,
                tokens: request.tokens,
                deadline: request.deadline,
                arrived: now,
                payloads: vec![request.payload],
            },
        );
        Admission::Queued
    }

    /// A cancel notice: remembered, and the request removed if it is queued here.
    pub fn cancel(&mut self, request_id: &str, now: Instant) -> Option<Dropped<T>> {
        self.cancels.remember(request_id, now);
        self.models.iter_mut().find_map(|(model, queue)| {
            let key = *queue.index.get(request_id)?;
            Some(queue.remove(model, key, DropReason::Cancelled))
        })
    }

    /// Removes what has expired, then dispatches every batch that is due.
    pub fn poll(&mut self, now: Instant) -> Cycle<T> {
        let mut cycle = Cycle { dropped: Vec::new(), batches: Vec::new() };
        for (model, queue) in &mut self.models {
            cycle.dropped.extend(queue.sweep(model, now));
            while let Some(batch) = queue.dispatch(model, &self.limits, now) {
                cycle.batches.push(batch);
            }
        }
        cycle
    }

    /// When [`Self::poll`] must run next although nothing arrives: the first `max_wait` to run
    /// out in a queue that may dispatch, or the first deadline of a queued request. An
    /// in-flight change ([`Self::published`], [`Self::observe`]) also calls for a poll.
    pub fn next_wake(&self) -> Option<Instant> {
        self.models
            .values()
            .flat_map(|q| {
                let wait = (q.in_flight.count() < self.limits.max_in_flight)
                    .then(|| q.oldest().map(|t| t + self.limits.max_wait))
                    .flatten();
                let deadline = q.entries.values().filter_map(|e| e.deadline).min();
                [wait, deadline]
            })
            .flatten()
            .min()
    }

    /// The stream acknowledged a batch of `model` at `at`.
    pub fn published(&mut self, model: &str, at: Instant) {
        let f = &mut self.models.entry(model.to_owned()).or_default().in_flight;
        f.unacked = f.unacked.saturating_sub(1);
        f.acked_since.push(at);
    }

    /// A batch of `model` could not be published: it is not in flight.
    pub fn publish_failed(&mut self, model: &str) {
        let f = &mut self.models.entry(model.to_owned()).or_default().in_flight;
        f.unacked = f.unacked.saturating_sub(1);
    }

    /// A count of the batches in `BATCHES` per model (absent: none), asked at `asked_at`.
    pub fn observe(&mut self, counts: &HashMap<String, usize>, asked_at: Instant) {
        for model in counts.keys() {
            self.models.entry(model.clone()).or_default();
        }
        for (model, queue) in &mut self.models {
            let f = &mut queue.in_flight;
            f.observed = counts.get(model).copied().unwrap_or(0);
            f.acked_since.retain(|at| *at > asked_at);
        }
    }

    pub fn in_flight(&self, model: &str) -> usize {
        self.models.get(model).map_or(0, |q| q.in_flight.count())
    }

    /// Requests queued for `model`.
    pub fn depth(&self, model: &str) -> usize {
        self.models.get(model).map_or(0, |q| q.entries.len())
    }

    /// The models seen so far.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Empties every queue (draining): the payloads of everything queued.
    pub fn take_all(&mut self) -> Vec<T> {
        let mut payloads = Vec::new();
        for queue in self.models.values_mut() {
            queue.index.clear();
            payloads.extend(std::mem::take(&mut queue.entries).into_values().flat_map(|e| e.payloads));
        }
        payloads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "m";
    const MS: Duration = Duration::from_millis(1);

    fn limits() -> Limits {
        Limits {
            max_batch_size: 4,
            max_batch_tokens: 100,
            max_wait: 20 * MS,
            max_in_flight: 2,
            dispatch_when_idle: true,
        }
    }

    fn queues(limits: Limits) -> Queues<&'static str> {
        Queues::new(limits, CancelMemory::new(Duration::from_secs(600), 1000))
    }

    fn req(id: &'static str, priority: i32, tokens: u32) -> Request<&'static str> {
        Request { request_id: id.to_owned(), priority, sequence: 0, tokens, deadline: None, payload: id }
    }

    /// A queue with one batch of `M` in flight, so nothing goes out as idle.
    fn busy(limits: Limits, t0: Instant) -> Queues<&'static str> {
        let mut q = queues(limits);
        q.observe(&HashMap::from([(M.to_owned(), 1)]), t0);
        q
    }

    fn ids<T>(b: &Batch<T>) -> Vec<&str> {
        b.request_ids()
    }

    fn one<T: std::fmt::Debug>(cycle: Cycle<T>) -> Batch<T> {
        assert!(cycle.dropped.is_empty(), "{:?}", cycle.dropped);
        let mut batches = cycle.batches;
        assert_eq!(batches.len(), 1, "{batches:?}");
        batches.pop().unwrap()
    }

    #[test]
    fn an_idle_model_dispatches_at_once_and_then_waits_while_busy() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        assert!(matches!(q.push(M, req("a", 0, 10), t0), Admission::Queued));
        let b = one(q.poll(t0));
        assert_eq!((b.reason, ids(&b)), (DispatchReason::Idle, vec!["a"]));
        assert_eq!(q.in_flight(M), 1);
        // Busy now: the next request waits for a trigger.
        q.push(M, req("b", 0, 10), t0 + MS);
        assert!(q.poll(t0 + MS).batches.is_empty());
        assert_eq!(q.depth(M), 1);
        assert_eq!(q.next_wake(), Some(t0 + 21 * MS));
    }

    #[test]
    fn with_idle_dispatch_off_an_idle_model_waits_for_a_trigger() {
        let t0 = Instant::now();
        let mut q = queues(Limits { dispatch_when_idle: false, ..limits() });
        q.push(M, req("a", 0, 10), t0);
        assert!(q.poll(t0).batches.is_empty(), "fixed batching: no dispatch on idle");
        assert_eq!(one(q.poll(t0 + 20 * MS)).reason, DispatchReason::Wait);
    }

    #[test]
    fn size_fires_at_max_batch_size_and_not_before() {
        let t0 = Instant::now();
        let mut q = busy(limits(), t0);
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            q.push(M, req(id, 0, 1), t0 + i as u32 * MS);
            assert!(q.poll(t0 + 5 * MS).batches.is_empty(), "only {} queued", i + 1);
        }
        q.push(M, req("d", 0, 1), t0 + 3 * MS);
        q.push(M, req("e", 0, 1), t0 + 3 * MS);
        let b = one(q.poll(t0 + 5 * MS));
        assert_eq!((b.reason, ids(&b)), (DispatchReason::Size, vec!["a", "b", "c", "d"]));
        assert_eq!(b.tokens, 4);
        assert_eq!(q.depth(M), 1, "e stays for the next batch");
    }

    #[test]
    fn tokens_fire_when_the_budget_is_reached_or_would_be_exceeded() {
        let t0 = Instant::now();
        // Reached exactly.
        let mut q = busy(limits(), t0);
        q.push(M, req("a", 0, 60), t0);
        assert!(q.poll(t0).batches.is_empty(), "60 of 100 tokens");
        q.push(M, req("b", 0, 40), t0);
        let b = one(q.poll(t0));
        assert_eq!((b.reason, ids(&b), b.tokens), (DispatchReason::Tokens, vec!["a", "b"], 100));
        // Would be exceeded: the batch goes without the request that does not fit.
        let mut q = busy(limits(), t0);
        q.push(M, req("a", 0, 60), t0);
        q.push(M, req("b", 0, 30), t0);
        assert!(q.poll(t0).batches.is_empty(), "90 of 100 tokens");
        q.push(M, req("c", 0, 30), t0);
        let b = one(q.poll(t0));
        assert_eq!((b.reason, ids(&b), b.tokens), (DispatchReason::Tokens, vec!["a", "b"], 90));
        assert_eq!(q.depth(M), 1);
        // A prompt over the whole budget goes alone.
        let mut q = busy(limits(), t0);
        q.push(M, req("huge", 0, 500), t0);
        let b = one(q.poll(t0));
        assert_eq!((b.reason, ids(&b)), (DispatchReason::Tokens, vec!["huge"]));
    }

    #[test]
    fn wait_fires_when_the_oldest_has_waited_max_wait() {
        let t0 = Instant::now();
        let mut q = busy(limits(), t0);
        q.push(M, req("a", 0, 1), t0);
        q.push(M, req("b", 0, 1), t0 + 10 * MS);
        assert_eq!(q.next_wake(), Some(t0 + 20 * MS));
        assert!(q.poll(t0 + 19 * MS).batches.is_empty());
        let b = one(q.poll(t0 + 20 * MS));
        assert_eq!((b.reason, ids(&b)), (DispatchReason::Wait, vec!["a", "b"]));
        assert_eq!(q.next_wake(), None);
    }

    #[test]
    fn the_in_flight_bound_stops_every_trigger_until_a_slot_frees() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        q.push(M, req("a", 0, 1), t0);
        assert_eq!(one(q.poll(t0)).reason, DispatchReason::Idle);
        q.push(M, req("b", 0, 1), t0);
        assert_eq!(one(q.poll(t0 + 20 * MS)).reason, DispatchReason::Wait);
        assert_eq!(q.in_flight(M), 2);
        // At the bound: size, tokens and wait all hold, and nothing goes.
        for (i, id) in ["c", "d", "e", "f", "g"].into_iter().enumerate() {
            q.push(M, req(id, 0, 20), t0 + i as u32 * MS);
        }
        assert!(q.poll(t0 + Duration::from_secs(5)).batches.is_empty());
        assert_eq!(q.next_wake(), None, "no timer while at the bound");
        // PubAcks alone free nothing: the batches are still in BATCHES.
        q.published(M, t0 + 30 * MS);
        q.published(M, t0 + 31 * MS);
        assert_eq!(q.in_flight(M), 2);
        assert!(q.poll(t0 + Duration::from_secs(5)).batches.is_empty());
        // A count asked after both PubAcks finds one left: one slot.
        q.observe(&HashMap::from([(M.to_owned(), 1)]), t0 + 40 * MS);
        assert_eq!(q.in_flight(M), 1);
        let b = one(q.poll(t0 + Duration::from_secs(5)));
        assert_eq!((b.reason, ids(&b)), (DispatchReason::Size, vec!["c", "d", "e", "f"]));
        assert!(q.poll(t0 + Duration::from_secs(5)).batches.is_empty(), "bound reached again");
        // Inference took everything: g goes (it has waited past max_wait).
        q.observe(&HashMap::new(), t0 + Duration::from_secs(6));
        let b = one(q.poll(t0 + Duration::from_secs(6)));
        assert_eq!((b.reason, ids(&b)), (DispatchReason::Wait, vec!["g"]));
    }

    #[test]
    fn counts_asked_before_a_pub_ack_do_not_free_that_batch() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        q.push(M, req("a", 0, 1), t0);
        one(q.poll(t0));
        q.published(M, t0 + 5 * MS);
        // Asked before the PubAck: it may not include the batch, which stays counted.
        q.observe(&HashMap::new(), t0 + 4 * MS);
        assert_eq!(q.in_flight(M), 1);
        q.observe(&HashMap::from([(M.to_owned(), 1)]), t0 + 6 * MS);
        assert_eq!(q.in_flight(M), 1);
        q.observe(&HashMap::new(), t0 + 7 * MS);
        assert_eq!(q.in_flight(M), 0);
        // A failed publish is not in flight.
        q.push(M, req("b", 0, 1), t0 + 8 * MS);
        one(q.poll(t0 + 8 * MS));
        q.publish_failed(M);
        assert_eq!(q.in_flight(M), 0);
    }

    #[test]
    fn batches_counted_before_this_process_started_keep_the_model_busy() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        q.observe(&HashMap::from([("other".to_owned(), 2)]), t0);
        q.push("other", req("a", 0, 1), t0);
        assert!(q.poll(t0).batches.is_empty(), "at the bound from the count alone");
        q.push(M, req("b", 0, 1), t0);
        assert_eq!(one(q.poll(t0)).model, M, "other models are independent");
    }

    #[test]
    fn higher_priority_first_and_arrival_order_within_a_priority() {
        let t0 = Instant::now();
        let mut q = busy(limits(), t0);
        for (i, (id, priority)) in
            [("l1", 0), ("h1", 5), ("l2", 0), ("m1", 1), ("h2", 5), ("l3", 0)].into_iter().enumerate()
        {
            q.push(M, req(id, priority, 1), t0 + i as u32 * MS);
        }
        let b = one(q.poll(t0 + 6 * MS));
        assert_eq!((b.reason, ids(&b)), (DispatchReason::Size, vec!["h1", "h2", "m1", "l1"]));
        assert_eq!(b.members.iter().map(|m| m.priority).collect::<Vec<_>>(), [5, 5, 1, 0]);
        // The low-priority rest go next, still in arrival order, once the model is idle again.
        q.published(M, t0 + 6 * MS);
        q.observe(&HashMap::new(), t0 + 7 * MS);
        let b = one(q.poll(t0 + 7 * MS));
        assert_eq!((b.reason, ids(&b)), (DispatchReason::Idle, vec!["l2", "l3"]));
    }

    #[test]
    fn expired_requests_are_refused_or_swept_and_never_dispatched() {
        let t0 = Instant::now();
        let mut q = busy(limits(), t0);
        let late = Request { deadline: Some(t0), ..req("late", 0, 1) };
        let Admission::Dropped(d) = q.push(M, late, t0) else { panic!("past its deadline on arrival") };
        assert_eq!(
            (d.reason, d.request_id.as_str(), d.payloads.as_slice()),
            (DropReason::Expired, "late", &["late"][..])
        );
        q.push(M, Request { deadline: Some(t0 + 10 * MS), ..req("soon", 0, 1) }, t0);
        q.push(M, req("keep", 0, 1), t0);
        assert_eq!(q.next_wake(), Some(t0 + 10 * MS), "the deadline wakes the loop before max_wait");
        let cycle = q.poll(t0 + 10 * MS);
        assert!(cycle.batches.is_empty());
        assert_eq!(cycle.dropped.len(), 1);
        assert_eq!((cycle.dropped[0].reason, cycle.dropped[0].request_id.as_str()), (DropReason::Expired, "soon"));
        let b = one(q.poll(t0 + 20 * MS));
        assert_eq!(ids(&b), ["keep"]);
        // Expiry is checked before dispatch, even for a batch due at that very moment.
        let mut q = queues(limits());
        q.push(M, Request { deadline: Some(t0 + MS), ..req("x", 0, 1) }, t0);
        let cycle = q.poll(t0 + MS);
        assert!(cycle.batches.is_empty());
        assert_eq!(cycle.dropped[0].request_id, "x");
    }

    #[test]
    fn cancelled_requests_are_removed_refused_and_never_dispatched() {
        let t0 = Instant::now();
        let mut q = busy(limits(), t0);
        q.push(M, req("a", 0, 1), t0);
        q.push(M, req("b", 0, 1), t0);
        let d = q.cancel("a", t0 + MS).expect("a was queued");
        assert_eq!((d.reason, d.model.as_str(), d.arrived), (DropReason::Cancelled, M, t0));
        assert!(q.cancel("nowhere", t0 + MS).is_none());
        // Cancelled before it arrived (and a redelivery of a removed one): refused.
        for id in ["nowhere", "a"] {
            let Admission::Dropped(d) = q.push(M, req(id, 0, 1), t0 + 2 * MS) else { panic!("{id} was cancelled") };
            assert_eq!(d.reason, DropReason::Cancelled);
        }
        let b = one(q.poll(t0 + 30 * MS));
        assert_eq!(ids(&b), ["b"]);
    }

    #[test]
    fn a_request_delivered_again_while_queued_joins_its_entry() {
        let t0 = Instant::now();
        let mut q = busy(limits(), t0);
        q.push(M, Request { payload: "first", ..req("a", 0, 1) }, t0);
        assert!(matches!(q.push(M, Request { payload: "again", ..req("a", 0, 1) }, t0), Admission::Joined));
        assert_eq!(q.depth(M), 1);
        let b = one(q.poll(t0 + 20 * MS));
        assert_eq!(b.members[0].payloads, ["first", "again"]);
    }

    #[test]
    fn draining_hands_back_everything_queued() {
        let t0 = Instant::now();
        let mut q = busy(limits(), t0);
        q.push(M, req("a", 0, 1), t0);
        q.push("other", req("b", 3, 1), t0);
        let mut all = q.take_all();
        all.sort();
        assert_eq!(all, ["a", "b"]);
        assert_eq!((q.depth(M), q.depth("other")), (0, 0));
    }
}
