//! Cancellation: `mr.v1.cancel.<request_id>` notices (core NATS) set the flag the engine checks
//! after every token of that request, so it stops inside a running batch while the rest of the
//! batch goes on.
//!
//! A notice may arrive before its request reaches this process (queued in the batcher, or in
//! BATCHES): notices are remembered for a while, bounded in count, and a request registered
//! later starts cancelled. Every replica hears every notice (no queue group): any of them may
//! hold the request.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a notice is remembered: past the longest deadline ingest grants (600 s), the
/// request has expired anyway.
pub const REMEMBER: Duration = Duration::from_secs(600);
/// Most notices remembered at once; the oldest are forgotten first.
pub const CAPACITY: usize = 65_536;

/// Request id → cancel flag of the requests running here, and the notices remembered.
pub struct CancelRegistry {
    state: Mutex<State>,
    remember: Duration,
    capacity: usize,
}

#[derive(Default)]
struct State {
    in_flight: HashMap<String, Arc<AtomicBool>>,
    cancelled: HashMap<String, Instant>,
    /// Notices in arrival order, to forget the oldest; a request cancelled twice appears twice.
    order: VecDeque<(String, Instant)>,
}

impl CancelRegistry {
    pub fn new(remember: Duration, capacity: usize) -> Arc<Self> {
        Arc::new(Self { state: Mutex::default(), remember, capacity: capacity.max(1) })
    }

    /// Marks `request_id` as running here until the registration drops; its flag is already
    /// set when a notice for it is remembered.
    pub fn register(self: &Arc<Self>, request_id: &str) -> Registration {
        let mut state = self.state.lock().expect("cancel registry lock");
        let cancelled = state.cancelled.get(request_id).is_some_and(|at| at.elapsed() < self.remember);
        let flag = Arc::new(AtomicBool::new(cancelled));
        state.in_flight.insert(request_id.to_owned(), flag.clone());
        Registration { registry: self.clone(), request_id: request_id.to_owned(), flag }
    }

    /// Stops `request_id` if it runs here, and remembers the notice for a later registration
    /// (also covering a redelivery of a batch that held it).
    pub fn cancel(&self, request_id: &str) {
        let now = Instant::now();
        let mut state = self.state.lock().expect("cancel registry lock");
        if let Some(flag) = state.in_flight.get(request_id) {
            flag.store(true, Ordering::Relaxed);
        }
        state.cancelled.insert(request_id.to_owned(), now);
        state.order.push_back((request_id.to_owned(), now));
        while let Some((id, at)) = state.order.front().cloned() {
            if state.order.len() <= self.capacity && at.elapsed() < self.remember {
                break;
            }
            state.order.pop_front();
            // Only the notice's latest arrival forgets it.
            if state.cancelled.get(&id) == Some(&at) {
                state.cancelled.remove(&id);
            }
        }
    }
}

/// A request running here; dropping it unregisters the request.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    request_id: String,
    flag: Arc<AtomicBool>,
}

impl Registration {
    /// The flag to hand to the engine.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.registry.state.lock().expect("cancel registry lock");
        // A later registration of the same id (a redelivery) owns the entry now: keep it.
        if state.in_flight.get(&self.request_id).is_some_and(|f| Arc::ptr_eq(f, &self.flag)) {
            state.in_flight.remove(&self.request_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_set(r: &Registration) -> bool {
        r.flag().load(Ordering::Relaxed)
    }

    fn remembered(registry: &CancelRegistry) -> usize {
        registry.state.lock().unwrap().cancelled.len()
    }

    #[test]
    fn a_cancel_sets_the_flag_of_the_running_request_only() {
        let registry = CancelRegistry::new(REMEMBER, CAPACITY);
        let (a, b) = (registry.register("a"), registry.register("b"));
        registry.cancel("a");
        assert!(is_set(&a));
        assert!(!is_set(&b));
    }

    #[test]
    fn a_cancel_before_the_request_arrives_still_applies() {
        let registry = CancelRegistry::new(REMEMBER, CAPACITY);
        registry.cancel("early");
        assert!(is_set(&registry.register("early")));
        assert!(!is_set(&registry.register("other")));
    }

    #[test]
    fn finished_requests_leave_the_registry() {
        let registry = CancelRegistry::new(REMEMBER, CAPACITY);
        let first = registry.register("r");
        let redelivered = registry.register("r");
        drop(first);
        registry.cancel("r");
        assert!(is_set(&redelivered), "the live registration survives the old one's drop");
        drop(redelivered);
        assert!(registry.state.lock().unwrap().in_flight.is_empty());
    }

    #[test]
    fn notices_are_forgotten_past_the_count_bound_oldest_first() {
        let registry = CancelRegistry::new(REMEMBER, 3);
        for id in ["a", "b", "c", "d"] {
            registry.cancel(id);
        }
        assert_eq!(remembered(&registry), 3);
        assert!(!is_set(&registry.register("a")));
        assert!(is_set(&registry.register("d")));
        // A repeated notice is remembered from its latest arrival.
        registry.cancel("b");
        registry.cancel("e");
        assert!(is_set(&registry.register("b")));
    }

    #[test]
    fn notices_are_forgotten_after_the_time_bound() {
        let registry = CancelRegistry::new(Duration::from_millis(20), CAPACITY);
        registry.cancel("old");
        std::thread::sleep(Duration::from_millis(30));
        assert!(!is_set(&registry.register("old")));
        registry.cancel("new");
        assert_eq!(remembered(&registry), 1, "expired notices are dropped as new ones arrive");
    }
}
