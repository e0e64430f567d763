//! Per-model scheduling in front of the inference replicas (pure: no NATS and no clock of its
//! own — every call that needs the time takes `now`, so tests drive it with plain `Instant`
//! arithmetic).
//!
//! One queue per model. The queue decides when a batch goes, which requests it takes, and which
//! requests it refuses on arrival.
//!
//! ## When: credit from the replicas' capacity reports
//!
//! Inference replicas run continuous batching: each keeps a running set of sequences and admits
//! new ones at every decode step, so a batch need not fill; what matters is that a replica is
//! handed only work it can start now, while everything else waits here, where priority,
//! deadline and fair share decide the order. Each replica reports its load ([`ReplicaLoad`],
//! from `ReplicaCapacity` on `mr.v1.capacity.<model>`) when it changes and at least every
//! heartbeat; a replica whose last report is older than 3 heartbeats is dropped. While a model
//! has a live replica it is **credit-gated**:
//!
//! `free slots = Σ over live replicas max(0, max_running − running − waiting) − requests dispatched since the newest report`
//!
//! and whenever free slots > 0 it sends, at once, batches of up to min(free slots,
//! `max_batch_size`) requests within `max_batch_tokens` (reason `capacity`) until the free slots
//! or the queue run out. Nothing waits for a batch to fill.
//!
//! Every report replaces its replica's figures and resets the model's count of requests
//! dispatched since a report. A batch is pulled by whichever replica gets to it, so the batcher
//! cannot tell which report will show it. Resetting only once *every* replica has reported
//! would hold free slots back until the quietest replica's heartbeat (an idle replica reports
//! nothing else), and under-dispatch idles the model. Resetting on any report errs the other
//! way: a report that arrives before the replica that pulled the last batch has reported it
//! counts those requests as free once more. That over-dispatch is harmless — the replica queues
//! the extra work FIFO and reports it as `waiting`, which its next figures subtract — and
//! bounded: each such report lets out at most the requests still in transit. A replica that
//! restarts reports under a new name; its old figures count until they age out.
//!
//! ## The fallback gate: no live report
//!
//! During start-up, and for inference replicas that do not report, the model has no live
//! report and the in-flight gate decides instead. A batch goes when, in this order of
//! precedence (the first that holds is the recorded reason):
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
//! ## Which: priority, fair share, deadline, arrival
//!
//! A batch takes requests from the highest non-empty priority class first. Priority is strict:
//! under sustained higher-priority load a lower priority waits (and may expire), as in Triton's
//! priority queue policy. Within a class, tenants share by tokens, with a virtual token counter
//! per tenant (VTC, "Fairness in Serving Large Language Models", Sheng et al., 2024): each next
//! member is the head of the tenant whose counter is lowest, and its cost (prompt tokens plus
//! the new tokens it may generate) is added to that counter. A tenant that becomes active is
//! lifted to the lowest counter among the active ones, so idle time earns no credit; a tenant
//! with nothing queued is forgotten, which forgives at most one request's cost of its lead,
//! since no active counter runs more than one request's cost ahead of the lowest. So a
//! tenant's flood cannot starve another tenant: the flood is served at the other's pace. A
//! tenant's own requests go earliest deadline first (those without one after all that have
//! one), then in arrival order (stream sequence).
//!
//! A batch stops at the first request that does not fit the token budget instead of skipping
//! to a smaller one behind it, so order is never traded for packing (a single prompt over the
//! budget goes alone rather than never).
//!
//! ## Refused on arrival: bounded queue, unreachable deadline
//!
//! Requests whose deadline has passed or that were cancelled never reach a batch: they are
//! refused on arrival, swept out at their deadline, removed when the cancel notice arrives,
//! and reported as [`Dropped`]. Cancel notices are remembered for a while ([`CancelMemory`]),
//! since one may arrive before its request does.
//!
//! A request is also refused as [`DropReason::Overloaded`] rather than queued when the model's
//! queue holds `max_queue` requests, or when its expected wait exceeds the time left to its
//! deadline: it would only expire here, later, having taken a place. The expected wait is the
//! cost queued ahead of it ÷ the model's drain rate. Cost, not count, because requests hold
//! replica slots for as long as they generate. *Ahead* is what the scheduler would serve first:
//! all of every higher priority class, its own tenant's requests before it, and of each other
//! tenant in its class what fair share serves before it (up to where that tenant's counter
//! reaches the level this tenant's will have when this request comes up). Requests yet to
//! arrive are not foreseen, so the estimate is a lower bound. The drain rate is an EWMA of the
//! cost dispatched per second of time the queue was non-empty (so idle spells do not dilute it);
//! before the first sample nothing is refused on this ground. Either refusal names a
//! `retry_after`: the expected wait (the time for what is ahead to drain), at least 100 ms.
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
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use millrace_bus::CancelMemory;

/// A replica whose last report is older than this many of its heartbeats is gone.
const HEARTBEATS_UNTIL_GONE: u32 = 3;
/// The shortest `retry_after` a refusal names: sooner, a retry would find the same queue.
const MIN_RETRY_AFTER: Duration = Duration::from_millis(100);
/// The longest: a wait estimated further out only says "much later", and a hint of hours would
/// keep a client away long after the backlog has cleared.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The least non-empty time one drain-rate sample spans: a single batch's timing is noise.
const DRAIN_SAMPLE: Duration = Duration::from_millis(100);
/// The newest sample's weight in the drain rate's EWMA.
const DRAIN_EWMA_WEIGHT: f64 = 0.25;

/// The batching policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_batch_size: usize,
    pub max_batch_tokens: u64,
    /// Fallback gate only: how long a request waits for its batch to fill while the model is busy.
    pub max_wait: Duration,
    /// Fallback gate only: batches per model in flight.
    pub max_in_flight: usize,
    /// Fallback gate only: dispatch at once when the model has nothing in flight. Off = classic
    /// fixed batching (size, tokens or wait only), kept for the batching benchmark's baseline.
    pub dispatch_when_idle: bool,
    /// Requests queued per model; one more is refused as overloaded.
    pub max_queue: usize,
}

/// Why a batch was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DispatchReason {
    /// Credit-gated: the model's replicas reported free slots.
    Capacity,
    Size,
    Tokens,
    Wait,
    Idle,
}

impl DispatchReason {
    /// As recorded in `Batch.dispatch_reason` and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Capacity => "capacity",
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
    /// Refused on arrival; the client may try again after `retry_after`.
    Overloaded {
        cause: Overload,
        retry_after: Duration,
    },
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::Overloaded { .. } => "overloaded",
        }
    }
}

/// Why an arriving request was refused as overloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// The model's queue holds `max_queue` requests.
    QueueFull,
    /// The work queued ahead of it would take longer to drain than its deadline leaves.
    DeadlineUnreachable,
}

impl Overload {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::DeadlineUnreachable => "deadline_unreachable",
        }
    }
}

/// A request offered to a queue; `payload` is whatever the caller needs back with it.
#[derive(Debug)]
pub struct Request<T> {
    pub request_id: String,
    /// Whose request it is: fair share is between tenants.
    pub tenant: String,
    pub priority: i32,
    /// Position in the arrival order: the prompt's stream sequence. Workers hand prompts over
    /// concurrently, so the order they reach the queue is not the order they arrived in.
    pub sequence: u64,
    /// Prompt tokens: what the batch token budget counts.
    pub tokens: u32,
    /// Tokens the request will cost a replica: its prompt plus the new tokens it may generate.
    /// What fair share charges and wait estimates weigh.
    pub cost: u64,
    /// `None`: no deadline.
    pub deadline: Option<Instant>,
    pub payload: T,
}

/// A request in a dispatched batch.
#[derive(Debug)]
pub struct Member<T> {
    pub request_id: String,
    pub tenant: String,
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
    /// In the order they were picked: highest priority first, then fair share between tenants,
    /// each tenant's earliest deadline, then arrival.
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
    /// Refused: already past its deadline, cancelled before it arrived, or overloaded.
    Dropped(Dropped<T>),
}

/// What one [`Queues::poll`] produced.
#[derive(Debug)]
pub struct Cycle<T> {
    pub dropped: Vec<Dropped<T>>,
    pub batches: Vec<Batch<T>>,
    /// `(model, replica)` of the replicas whose reports aged out.
    pub replicas_gone: Vec<(String, String)>,
}

/// An inference replica's load, from its capacity report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaLoad {
    pub replica: String,
    pub running: u32,
    pub waiting: u32,
    pub max_running: u32,
    /// The longest the replica promises to stay silent; a report promising no heartbeat (zero)
    /// is gone at once, so it is never relied on.
    pub heartbeat: Duration,
}

impl ReplicaLoad {
    /// Sequences the replica could start now.
    pub fn free_slots(&self) -> u32 {
        self.max_running.saturating_sub(self.running.saturating_add(self.waiting))
    }
}

/// When a request is due: one with a deadline before one without (the variants' order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    By(Instant),
    Whenever,
}

/// A queued request's place: priority (highest first), deadline (earliest first), stream
/// sequence, then push order (unique).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    priority: Reverse<i32>,
    due: Due,
    sequence: u64,
    push: u64,
}

#[derive(Debug)]
struct Entry<T> {
    request_id: String,
    tenant: String,
    tokens: u32,
    cost: u64,
    arrived: Instant,
    payloads: Vec<T>,
}

/// A tenant with requests queued in one priority class.
#[derive(Debug, Default)]
struct TenantQueue {
    /// The virtual token counter: the cost this class has served the tenant, lifted when the
    /// tenant became active.
    served: u64,
    queued: BTreeSet<Key>,
    queued_cost: u64,
}

/// The tenants with requests queued in one priority class.
type Class = BTreeMap<String, TenantQueue>;

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
struct Reported {
    load: ReplicaLoad,
    gone_at: Instant,
}

/// A model's replicas, from their capacity reports (see the module docs).
#[derive(Debug, Default)]
struct Capacity {
    replicas: BTreeMap<String, Reported>,
    /// Requests dispatched since the newest report was received.
    dispatched_since_report: usize,
}

impl Capacity {
    fn report(&mut self, load: ReplicaLoad, now: Instant) {
        let gone_at = now + load.heartbeat * HEARTBEATS_UNTIL_GONE;
        self.replicas.insert(load.replica.clone(), Reported { load, gone_at });
        self.dispatched_since_report = 0;
    }

    /// Drops the replicas whose reports have aged out, naming them.
    fn prune(&mut self, now: Instant) -> Vec<String> {
        let gone: Vec<String> =
            self.replicas.iter().filter(|(_, r)| r.gone_at <= now).map(|(name, _)| name.clone()).collect();
        for name in &gone {
            self.replicas.remove(name);
        }
        gone
    }

    /// `None` while no replica report is live: the fallback gate applies.
    fn free_slots(&self) -> Option<usize> {
        if self.replicas.is_empty() {
            return None;
        }
        let reported: usize = self.replicas.values().map(|r| r.load.free_slots() as usize).sum();
        Some(reported.saturating_sub(self.dispatched_since_report))
    }

    fn next_gone(&self) -> Option<Instant> {
        self.replicas.values().map(|r| r.gone_at).min()
    }
}

/// How fast a model's queue drains: an EWMA of the cost dispatched per second of time the
/// queue was non-empty, sampled at dispatches once a sample spans [`DRAIN_SAMPLE`].
#[derive(Debug, Default)]
struct DrainRate {
    cost_per_second: Option<f64>,
    /// Since when the queue has been non-empty (`None`: empty).
    busy_since: Option<Instant>,
    /// Non-empty time of the sample being gathered, before `busy_since`.
    busy: Duration,
    /// Cost dispatched in the sample being gathered.
    drained: u64,
}

impl DrainRate {
    /// Starts or stops the non-empty clock.
    fn depth_changed(&mut self, empty: bool, now: Instant) {
        match (self.busy_since, empty) {
            (None, false) => self.busy_since = Some(now),
            (Some(since), true) => {
                self.busy += now.saturating_duration_since(since);
                self.busy_since = None;
            }
            _ => {}
        }
    }

    fn drained(&mut self, cost: u64, now: Instant) {
        self.drained += cost;
        let busy = self.busy + self.busy_since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        if busy < DRAIN_SAMPLE || self.drained == 0 {
            return;
        }
        let sample = self.drained as f64 / busy.as_secs_f64();
        self.cost_per_second = Some(self.cost_per_second.map_or(sample, |r| r + DRAIN_EWMA_WEIGHT * (sample - r)));
        self.drained = 0;
        self.busy = Duration::ZERO;
        self.busy_since = self.busy_since.map(|_| now);
    }

    /// How long `cost` takes to drain; `None` before the first sample.
    fn time_for(&self, cost: u64) -> Option<Duration> {
        let rate = self.cost_per_second?;
        Some(Duration::try_from_secs_f64(cost as f64 / rate).unwrap_or(Duration::MAX))
    }
}

/// The requests a batch would take, in the order it would take them.
#[derive(Debug, Default)]
struct Plan {
    keys: Vec<Key>,
    tokens: u64,
    /// It stopped because the next request did not fit the token budget.
    token_full: bool,
}

#[derive(Debug)]
struct ModelQueue<T> {
    /// Highest priority first, then deadline and arrival order.
    entries: BTreeMap<Key, Entry<T>>,
    index: HashMap<String, Key>,
    /// Per priority class, highest first, the tenants with requests queued in it.
    classes: BTreeMap<Reverse<i32>, Class>,
    in_flight: InFlight,
    capacity: Capacity,
    drain: DrainRate,
}

impl<T> Default for ModelQueue<T> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            index: HashMap::new(),
            classes: BTreeMap::new(),
            in_flight: InFlight::default(),
            capacity: Capacity::default(),
            drain: DrainRate::default(),
        }
    }
}

impl<T> ModelQueue<T> {
    fn insert(&mut self, key: Key, entry: Entry<T>, now: Instant) {
        let class = self.classes.entry(key.priority).or_default();
        // Idle time earns no credit: a tenant becomes active level with the least served.
        let least_served = class.values().map(|t| t.served).min().unwrap_or(0);
        let tenant = class
            .entry(entry.tenant.clone())
            .or_insert_with(|| TenantQueue { served: least_served, ..Default::default() });
        tenant.queued.insert(key);
        tenant.queued_cost += entry.cost;
        self.index.insert(entry.request_id.clone(), key);
        self.entries.insert(key, entry);
        self.drain.depth_changed(false, now);
    }

    /// Removes a queued request; a tenant left with nothing queued is forgotten.
    fn take(&mut self, key: Key, now: Instant) -> Entry<T> {
        let entry = self.entries.remove(&key).expect("queued keys have entries");
        self.index.remove(&entry.request_id);
        let class = self.classes.get_mut(&key.priority).expect("queued keys have a class");
        let tenant = class.get_mut(&entry.tenant).expect("queued keys have a tenant");
        tenant.queued.remove(&key);
        tenant.queued_cost -= entry.cost;
        if tenant.queued.is_empty() {
            class.remove(&entry.tenant);
            if class.is_empty() {
                self.classes.remove(&key.priority);
            }
        }
        self.drain.depth_changed(self.entries.is_empty(), now);
        entry
    }

    fn remove(&mut self, model: &str, key: Key, reason: DropReason, now: Instant) -> Dropped<T> {
        let e = self.take(key, now);
        Dropped { model: model.to_owned(), request_id: e.request_id, reason, arrived: e.arrived, payloads: e.payloads }
    }

    fn sweep(&mut self, model: &str, now: Instant) -> Vec<Dropped<T>> {
        let expired: Vec<Key> = self.entries.keys().filter(|k| k.due <= Due::By(now)).copied().collect();
        expired.into_iter().map(|k| self.remove(model, k, DropReason::Expired, now)).collect()
    }

    fn oldest(&self) -> Option<Instant> {
        self.entries.values().map(|e| e.arrived).min()
    }

    /// The next batch's members: from the highest priority class down, each time the head of
    /// the least-served tenant, up to `max_members` and `max_tokens` (a first request over the
    /// budget goes alone).
    fn plan(&self, max_members: usize, max_tokens: u64) -> Plan {
        let mut plan = Plan::default();
        for class in self.classes.values() {
            let mut tenants: Vec<_> = class.values().map(|t| (t.served, t.queued.iter().peekable())).collect();
            loop {
                if plan.keys.len() == max_members {
                    return plan;
                }
                // Ties go to the earlier head, so equally served tenants alternate by deadline
                // and arrival.
                let next = tenants
                    .iter_mut()
                    .enumerate()
                    .filter_map(|(i, (served, heads))| heads.peek().map(|&&key| (*served, key, i)))
                    .min();
                let Some((_, key, i)) = next else { break };
                let entry = &self.entries[&key];
                if !plan.keys.is_empty() && plan.tokens + u64::from(entry.tokens) > max_tokens {
                    plan.token_full = true;
                    return plan;
                }
                plan.keys.push(key);
                plan.tokens += u64::from(entry.tokens);
                tenants[i].0 += entry.cost;
                tenants[i].1.next();
            }
        }
        plan
    }

    /// The fallback gate: the next batch, and why it would go now (if it would).
    fn fallback_trigger(&self, limits: &Limits, now: Instant) -> Option<(Plan, DispatchReason)> {
        if self.entries.is_empty() || self.in_flight.count() >= limits.max_in_flight {
            return None;
        }
        let plan = self.plan(limits.max_batch_size, limits.max_batch_tokens);
        let reason = if plan.keys.len() == limits.max_batch_size {
            DispatchReason::Size
        } else if plan.token_full || plan.tokens >= limits.max_batch_tokens {
            DispatchReason::Tokens
        } else if self.oldest().is_some_and(|t| now.saturating_duration_since(t) >= limits.max_wait) {
            DispatchReason::Wait
        } else if limits.dispatch_when_idle && self.in_flight.count() == 0 {
            DispatchReason::Idle
        } else {
            return None;
        };
        Some((plan, reason))
    }

    fn dispatch(&mut self, model: &str, limits: &Limits, now: Instant) -> Option<Batch<T>> {
        let (plan, reason) = match self.capacity.free_slots() {
            None => self.fallback_trigger(limits, now)?,
            Some(free) if free > 0 && !self.entries.is_empty() => {
                (self.plan(free.min(limits.max_batch_size), limits.max_batch_tokens), DispatchReason::Capacity)
            }
            Some(_) => return None,
        };
        let mut members = Vec::with_capacity(plan.keys.len());
        let mut cost = 0;
        for key in plan.keys {
            let e = self.take(key, now);
            // Charged after the take: a tenant it left with nothing queued is forgotten anyway.
            if let Some(tenant) = self.classes.get_mut(&key.priority).and_then(|c| c.get_mut(&e.tenant)) {
                tenant.served += e.cost;
            }
            cost += e.cost;
            members.push(Member {
                request_id: e.request_id,
                tenant: e.tenant,
                priority: key.priority.0,
                tokens: e.tokens,
                arrived: e.arrived,
                payloads: e.payloads,
            });
        }
        self.in_flight.unacked += 1;
        self.capacity.dispatched_since_report += members.len();
        self.drain.drained(cost, now);
        Some(Batch { model: model.to_owned(), reason, tokens: plan.tokens, members })
    }

    /// The cost the scheduler would serve before a request at `key` of `tenant` (see the module
    /// docs).
    fn cost_ahead(&self, key: &Key, tenant: &str) -> u64 {
        let higher: u64 =
            self.classes.range(..key.priority).flat_map(|(_, class)| class.values()).map(|t| t.queued_cost).sum();
        let Some(class) = self.classes.get(&key.priority) else { return higher };
        let (served, own_ahead) = match class.get(tenant) {
            Some(t) => (t.served, t.queued.range(..*key).map(|k| self.entries[k].cost).sum()),
            None => (class.values().map(|t| t.served).min().unwrap_or(0), 0),
        };
        // The request comes up once its tenant has paid for what is ahead of it and is the
        // least served: each other tenant is served until its counter reaches that level.
        let level = served + own_ahead;
        let others: u64 = class
            .iter()
            .filter(|(name, _)| name.as_str() != tenant)
            .map(|(_, t)| t.queued_cost.min(level.saturating_sub(t.served)))
            .sum();
        higher + own_ahead + others
    }

    /// Why a request must be refused rather than queued at `key`, if it must.
    fn overload(&self, key: &Key, request: &Request<T>, max_queue: usize, now: Instant) -> Option<DropReason> {
        let full = self.entries.len() >= max_queue;
        let time_left = request.deadline.map(|d| d.saturating_duration_since(now));
        if !full && time_left.is_none() {
            return None;
        }
        let wait = self.drain.time_for(self.cost_ahead(key, &request.tenant));
        let cause = if full {
            Overload::QueueFull
        } else if wait.zip(time_left).is_some_and(|(wait, left)| wait > left) {
            Overload::DeadlineUnreachable
        } else {
            return None;
        };
        let retry_after = wait.unwrap_or(Duration::ZERO).clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER);
        Some(DropReason::Overloaded { cause, retry_after })
    }
}

/// Every model's queue, the in-flight ledger, the replicas' capacity and the cancel notices.
#[derive(Debug)]
pub struct Queues<T> {
    limits: Limits,
    models: BTreeMap<String, ModelQueue<T>>,
    cancels: CancelMemory,
    next_push: u64,
}

impl<T> Queues<T> {
    pub fn new(limits: Limits, cancels: CancelMemory) -> Self {
        let limits = Limits {
            max_batch_size: limits.max_batch_size.max(1),
            max_in_flight: limits.max_in_flight.max(1),
            max_batch_tokens: limits.max_batch_tokens.max(1),
            max_queue: limits.max_queue.max(1),
            ..limits
        };
        Self { limits, models: BTreeMap::new(), cancels, next_push: 0 }
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
        let queue = self.models.entry(model.to_owned()).or_default();
        if refused.is_none()
            && let Some(key) = queue.index.get(&request.request_id)
        {
            queue.entries.get_mut(key).expect("indexed entries exist").payloads.push(request.payload);
            return Admission::Joined;
        }
        let key = Key {
            priority: Reverse(request.priority),
            due: request.deadline.map_or(Due::Whenever, Due::By),
            sequence: request.sequence,
            push: self.next_push,
        };
        if let Some(reason) = refused.or_else(|| queue.overload(&key, &request, self.limits.max_queue, now)) {
            return Admission::Dropped(Dropped {
                model: model.to_owned(),
                request_id: request.request_id,
                reason,
                arrived: now,
                payloads: vec![request.payload],
            });
        }
        self.next_push += 1;
        let entry = Entry {
            request_id: request.request_id,
            tenant: request.tenant,
            tokens: request.tokens,
            cost: request.cost,
            arrived: now,
            payloads: vec![request.payload],
        };
        queue.insert(key, entry, now);
        Admission::Queued
    }

    /// A cancel notice: remembered, and the request removed if it is queued here.
    pub fn cancel(&mut self, request_id: &str, now: Instant) -> Option<Dropped<T>> {
        self.cancels.remember(request_id, now);
        self.models.iter_mut().find_map(|(model, queue)| {
            let key = *queue.index.get(request_id)?;
            Some(queue.remove(model, key, DropReason::Cancelled, now))
        })
    }

    /// A capacity report of one of `model`'s replicas, received at `now`.
    pub fn report(&mut self, model: &str, load: ReplicaLoad, now: Instant) {
        self.models.entry(model.to_owned()).or_default().capacity.report(load, now);
    }

    /// Drops aged-out replica reports, removes what has expired, then dispatches every batch
    /// that is due.
    pub fn poll(&mut self, now: Instant) -> Cycle<T> {
        let mut cycle = Cycle { dropped: Vec::new(), batches: Vec::new(), replicas_gone: Vec::new() };
        for (model, queue) in &mut self.models {
            cycle.replicas_gone.extend(queue.capacity.prune(now).into_iter().map(|r| (model.clone(), r)));
            cycle.dropped.extend(queue.sweep(model, now));
            while let Some(batch) = queue.dispatch(model, &self.limits, now) {
                cycle.batches.push(batch);
            }
        }
        cycle
    }

    /// When [`Self::poll`] must run next although nothing arrives: the first deadline of a
    /// queued request; for a credit-gated model with requests queued, the first replica report
    /// to age out; for one under the fallback gate that may dispatch, the first `max_wait` to
    /// run out. A report or an in-flight change ([`Self::published`], [`Self::observe`]) also
    /// calls for a poll.
    pub fn next_wake(&self) -> Option<Instant> {
        self.models
            .values()
            .filter(|q| !q.entries.is_empty())
            .flat_map(|q| {
                let gate = if q.capacity.free_slots().is_some() {
                    q.capacity.next_gone()
                } else if q.in_flight.count() < self.limits.max_in_flight {
                    q.oldest().map(|t| t + self.limits.max_wait)
                } else {
                    None
                };
                let deadline = q
                    .entries
                    .keys()
                    .filter_map(|k| match k.due {
                        Due::By(at) => Some(at),
                        Due::Whenever => None,
                    })
                    .min();
                [gate, deadline]
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

    /// The free slots `model` is credited with; `None` while it has no live replica report
    /// (the fallback gate applies).
    pub fn free_slots(&self, model: &str) -> Option<usize> {
        self.models.get(model).and_then(|q| q.capacity.free_slots())
    }

    /// Requests queued for `model`.
    pub fn depth(&self, model: &str) -> usize {
        self.models.get(model).map_or(0, |q| q.entries.len())
    }

    /// Requests queued for `model` per priority, highest first (only priorities with some).
    pub fn depth_by_priority(&self, model: &str) -> Vec<(i32, usize)> {
        self.models.get(model).map_or_else(Vec::new, |q| {
            q.classes
                .iter()
                .map(|(Reverse(priority), class)| (*priority, class.values().map(|t| t.queued.len()).sum()))
                .collect()
        })
    }

    /// `model`'s drain rate (cost per second of non-empty queue); `None` before it is measured.
    pub fn drain_rate(&self, model: &str) -> Option<f64> {
        self.models.get(model).and_then(|q| q.drain.cost_per_second)
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
            queue.classes.clear();
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
            max_queue: 4096,
        }
    }

    fn queues<T>(limits: Limits) -> Queues<T> {
        Queues::new(limits, CancelMemory::new(Duration::from_secs(600), 1000))
    }

    /// Tenant `t`, costing its prompt tokens.
    fn req(id: &'static str, priority: i32, tokens: u32) -> Request<&'static str> {
        Request {
            request_id: id.to_owned(),
            tenant: "t".to_owned(),
            priority,
            sequence: 0,
            tokens,
            cost: u64::from(tokens),
            deadline: None,
            payload: id,
        }
    }

    /// `tenant`'s request `id`, arrived as stream sequence `sequence`, costing 100 tokens.
    fn of(tenant: &str, id: String, sequence: u64) -> Request<String> {
        Request {
            request_id: id.clone(),
            tenant: tenant.to_owned(),
            priority: 0,
            sequence,
            tokens: 10,
            cost: 100,
            deadline: None,
            payload: id,
        }
    }

    /// A report of replica `name` with `free` slots of 8 (the rest running), heartbeat 1 s.
    fn load(name: &str, free: u32) -> ReplicaLoad {
        ReplicaLoad {
            replica: name.to_owned(),
            running: 8 - free,
            waiting: 0,
            max_running: 8,
            heartbeat: Duration::from_secs(1),
        }
    }

    /// A queue with one batch of `M` in flight, so nothing goes out as idle.
    fn busy<T>(limits: Limits, t0: Instant) -> Queues<T> {
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

    /// Everything dispatched by polls at `now`, as request ids in pick order.
    fn drain<T>(q: &mut Queues<T>, now: Instant) -> Vec<String> {
        let cycle = q.poll(now);
        cycle.batches.iter().flat_map(|b| b.request_ids()).map(str::to_owned).collect()
    }

    #[test]
    fn priority_then_earliest_deadline_then_arrival() {
        let t0 = Instant::now();
        let mut q = busy(limits(), t0);
        let with = |id, priority, sequence, deadline: Option<Duration>| Request {
            sequence,
            deadline: deadline.map(|d| t0 + d),
            ..req(id, priority, 1)
        };
        q.push(M, with("none-late", 0, 1, None), t0);
        q.push(M, with("by-50", 0, 2, Some(50 * MS)), t0);
        q.push(M, with("by-30", 0, 3, Some(30 * MS)), t0);
        q.push(M, with("high", 2, 4, None), t0);
        // Pushed last but earlier on the stream: arrival is the stream sequence.
        q.push(M, with("none-early", 0, 0, None), t0);
        let b = one(q.poll(t0 + MS));
        assert_eq!((b.reason, ids(&b)), (DispatchReason::Size, vec!["high", "by-30", "by-50", "none-early"]));
        assert_eq!(b.members.iter().map(|m| m.priority).collect::<Vec<_>>(), [2, 0, 0, 0]);
        assert_eq!(q.depth(M), 1, "none-late waits");
    }

    #[test]
    fn reported_free_slots_let_out_that_many_at_once_and_no_more() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        // Full replica: nothing goes, although the model has nothing in flight.
        q.report(M, ReplicaLoad { waiting: 3, running: 5, ..load("r1", 0) }, t0);
        q.push(M, req("a", 0, 1), t0);
        q.push(M, req("b", 0, 1), t0);
        assert!(q.poll(t0).batches.is_empty());
        assert_eq!(q.free_slots(M), Some(0));
        assert_eq!(q.next_wake(), Some(t0 + Duration::from_secs(3)), "no max_wait timer, only the report's age");
        // 3 + 4 free over two replicas: seven go at once, in batches of at most max_batch_size,
        // whatever the in-flight count.
        q.report(M, load("r1", 3), t0 + MS);
        q.report(M, load("r2", 4), t0 + MS);
        assert_eq!(q.free_slots(M), Some(7));
        for id in ["c", "d", "e", "f", "g", "h"] {
            q.push(M, req(id, 0, 1), t0 + MS);
        }
        let cycle = q.poll(t0 + MS);
        let got: Vec<_> = cycle.batches.iter().map(|b| (b.reason, ids(b))).collect();
        assert_eq!(
            got,
            [(DispatchReason::Capacity, vec!["a", "b", "c", "d"]), (DispatchReason::Capacity, vec!["e", "f", "g"])]
        );
        assert_eq!((q.in_flight(M), q.free_slots(M), q.depth(M)), (2, Some(0), 1));
        // Dispatched since the newest report: h waits for the next one.
        assert!(q.poll(t0 + 2 * MS).batches.is_empty());
        q.report(M, load("r2", 0), t0 + 3 * MS);
        assert_eq!(q.free_slots(M), Some(3), "r2's report replaces its figures; r1's stand");
        let b = one(q.poll(t0 + 3 * MS));
        assert_eq!((b.reason, ids(&b)), (DispatchReason::Capacity, vec!["h"]));
        assert_eq!(q.free_slots(M), Some(2));
    }

    #[test]
    fn credit_gated_batches_keep_the_token_budget() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        for id in ["a", "b", "c"] {
            q.push(M, req(id, 0, 60), t0);
        }
        q.report(M, load("r1", 8), t0);
        let cycle = q.poll(t0);
        let got: Vec<_> = cycle.batches.iter().map(|b| (b.tokens, ids(b))).collect();
        assert_eq!(got, [(60, vec!["a"]), (60, vec!["b"]), (60, vec!["c"])]);
        assert_eq!(q.free_slots(M), Some(5));
    }

    #[test]
    fn a_replica_silent_for_three_heartbeats_is_dropped_and_the_fallback_gate_returns() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        let heartbeat = 100 * MS;
        q.report(M, ReplicaLoad { heartbeat, ..load("r1", 2) }, t0);
        q.report(M, ReplicaLoad { heartbeat, ..load("r2", 0) }, t0 + 200 * MS);
        assert_eq!(q.free_slots(M), Some(2));
        let cycle = q.poll(t0 + 300 * MS);
        assert_eq!(cycle.replicas_gone, [(M.to_owned(), "r1".to_owned())]);
        assert_eq!(q.free_slots(M), Some(0), "r2 is live, with nothing free");
        q.push(M, req("a", 0, 1), t0 + 490 * MS);
        assert!(q.poll(t0 + 490 * MS).batches.is_empty());
        assert_eq!(q.next_wake(), Some(t0 + 500 * MS));
        // No live report left: the in-flight gate decides again (idle: at once).
        let cycle = q.poll(t0 + 500 * MS);
        assert_eq!(cycle.replicas_gone, [(M.to_owned(), "r2".to_owned())]);
        let b = one(cycle);
        assert_eq!((b.reason, ids(&b)), (DispatchReason::Idle, vec!["a"]));
        assert_eq!(q.free_slots(M), None);
        // A report that promises no heartbeat is never relied on.
        q.report(M, ReplicaLoad { heartbeat: Duration::ZERO, ..load("r3", 0) }, t0 + 600 * MS);
        q.push(M, req("b", 0, 1), t0 + 600 * MS);
        q.published(M, t0 + 600 * MS);
        q.observe(&HashMap::new(), t0 + 600 * MS);
        assert_eq!(ids(&one(q.poll(t0 + 600 * MS))), ["b"]);
    }

    #[test]
    fn a_tenants_flood_does_not_starve_another_tenant() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        for i in 0..30 {
            q.push(M, of("flood", format!("a{i}"), i), t0);
        }
        for i in 0..3 {
            q.push(M, of("light", format!("b{i}"), 100 + i), t0 + MS);
        }
        q.report(M, load("r1", 8), t0 + MS);
        let order = drain(&mut q, t0 + MS);
        // Equal costs: the two alternate while both have work, although every flood request
        // arrived first.
        assert_eq!(order, ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "a4"]);
    }

    #[test]
    fn fair_share_is_by_tokens() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        for i in 0..10 {
            q.push(M, of("small", format!("s{i}"), i), t0);
            q.push(M, Request { cost: 300, ..of("large", format!("l{i}"), 100 + i) }, t0);
        }
        q.report(M, load("r1", 8), t0);
        let order = drain(&mut q, t0);
        // Three 100-token requests for each 300-token one.
        assert_eq!(order, ["s0", "l0", "s1", "s2", "s3", "l1", "s4", "s5"]);
    }

    #[test]
    fn idle_time_earns_no_credit() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        for i in 0..20 {
            q.push(M, of("busy", format!("a{i}"), i), t0);
        }
        q.report(M, load("r1", 8), t0);
        assert_eq!(drain(&mut q, t0).len(), 8, "only one tenant so far");
        // The newcomer starts level with the busy tenant, not 800 tokens behind it.
        for i in 0..5 {
            q.push(M, of("newcomer", format!("b{i}"), 100 + i), t0 + MS);
        }
        q.report(M, load("r1", 4), t0 + MS);
        assert_eq!(drain(&mut q, t0 + MS), ["a8", "b0", "a9", "b1"]);
    }

    #[test]
    fn fair_share_works_within_a_priority_class_and_priority_stays_strict() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        for i in 0..4 {
            q.push(M, of("a", format!("a{i}"), i), t0);
        }
        q.push(M, Request { priority: 1, ..of("b", "b-high".to_owned(), 10) }, t0);
        q.push(M, of("b", "b-low".to_owned(), 11), t0);
        q.report(M, load("r1", 8), t0);
        assert_eq!(drain(&mut q, t0), ["b-high", "a0", "b-low", "a1", "a2", "a3"]);
    }

    #[test]
    fn a_full_queue_refuses_at_once_with_a_retry_hint() {
        let t0 = Instant::now();
        let mut q = busy(Limits { max_queue: 2, ..limits() }, t0);
        q.push(M, req("a", 0, 1), t0);
        q.push(M, req("b", 0, 1), t0);
        let Admission::Dropped(d) = q.push(M, req("c", 0, 1), t0) else { panic!("the queue is full") };
        assert_eq!(
            (d.reason, d.request_id.as_str(), d.payloads.as_slice()),
            (DropReason::Overloaded { cause: Overload::QueueFull, retry_after: 100 * MS }, "c", &["c"][..]),
            "no drain rate yet: the shortest hint"
        );
        assert_eq!(d.reason.as_str(), "overloaded");
        // A redelivery of a queued request is no new request.
        assert!(matches!(q.push(M, req("a", 0, 1), t0), Admission::Joined));
        assert_eq!(q.depth(M), 2);
        q.cancel("b", t0);
        assert!(matches!(q.push(M, req("c", 0, 1), t0), Admission::Queued));
    }

    #[test]
    fn a_request_whose_deadline_the_queue_cannot_meet_is_refused_on_arrival() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        let due = |id, tenant: &str, priority, deadline: Duration, at: Instant| Request {
            tenant: tenant.to_owned(),
            priority,
            cost: 100,
            deadline: Some(at + deadline),
            ..req(id, 0, 1)
        };
        q.report(M, load("r1", 0), t0);
        for id in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"] {
            q.push(M, due(id, "t", 0, 250 * MS, t0), t0);
        }
        // No drain rate yet: nothing is refused for its deadline.
        let now = t0 + 50 * MS;
        assert!(matches!(q.push(M, due("early", "t", 0, MS, now), now), Admission::Queued));
        q.cancel("early", now);
        // Two requests (200 tokens) drain in 100 ms of queued work: 2000 tokens/s.
        let now = t0 + 100 * MS;
        q.report(M, load("r1", 2), now);
        assert_eq!(drain(&mut q, now), ["a", "b"]);
        assert_eq!(q.drain_rate(M), Some(2000.0));
        // 800 tokens of the same tenant ahead (due earlier): 400 ms.
        let Admission::Dropped(d) = q.push(M, due("x", "t", 0, 300 * MS, now), now) else { panic!("400 ms > 300 ms") };
        let DropReason::Overloaded { cause, retry_after } = d.reason else { panic!("{:?}", d.reason) };
        assert_eq!(cause, Overload::DeadlineUnreachable);
        assert!(retry_after.abs_diff(400 * MS) < MS, "{retry_after:?}");
        assert!(matches!(q.push(M, due("y", "t", 0, 500 * MS, now), now), Admission::Queued));
        // A higher priority has nothing ahead of it.
        assert!(matches!(q.push(M, due("z", "t", 1, 10 * MS, now), now), Admission::Queued));
        // Another tenant is not behind the first one's backlog, only behind the higher class.
        assert!(matches!(q.push(M, due("u", "other", 0, 60 * MS, now), now), Admission::Queued));
        let Admission::Dropped(d) = q.push(M, due("v", "other", 0, 80 * MS, now), now) else {
            panic!("behind z and u, and as much of t's backlog as fair share serves first: 150 ms")
        };
        assert!(matches!(d.reason, DropReason::Overloaded { cause: Overload::DeadlineUnreachable, .. }));
    }

    #[test]
    fn the_drain_rate_counts_only_time_with_work_queued() {
        let t0 = Instant::now();
        let mut q = queues(limits());
        q.report(M, load("r1", 0), t0);
        q.push(M, req("a", 0, 100), t0);
        q.report(M, load("r1", 1), t0 + 50 * MS);
        assert_eq!(drain(&mut q, t0 + 50 * MS), ["a"]);
        assert_eq!(q.drain_rate(M), None, "50 ms is too short a sample");
        // Ten empty seconds later: 200 tokens in 100 ms of queued work.
        let later = t0 + Duration::from_secs(10);
        q.push(M, req("b", 0, 100), later);
        q.report(M, load("r1", 1), later + 50 * MS);
        assert_eq!(drain(&mut q, later + 50 * MS), ["b"]);
        assert_eq!(q.drain_rate(M), Some(2000.0));
        // Then an EWMA: a stalled second (nothing, then 100 tokens) pulls it down by a quarter
        // of the difference.
        q.report(M, load("r1", 0), later + 50 * MS);
        q.push(M, req("c", 0, 100), later + 50 * MS);
        q.report(M, load("r1", 1), later + 1050 * MS);
        assert_eq!(drain(&mut q, later + 1050 * MS), ["c"]);
        assert_eq!(q.drain_rate(M), Some(2000.0 + 0.25 * (100.0 - 2000.0)));
    }

    #[test]
    fn depth_is_counted_per_priority() {
        let t0 = Instant::now();
        let mut q = busy(limits(), t0);
        q.push(M, req("a", 0, 1), t0);
        q.push(M, req("b", 3, 1), t0);
        q.push(M, Request { tenant: "u".to_owned(), ..req("c", 0, 1) }, t0);
        assert_eq!(q.depth_by_priority(M), [(3, 1), (0, 2)]);
        q.cancel("b", t0);
        assert_eq!(q.depth_by_priority(M), [(0, 2)]);
    }
}
