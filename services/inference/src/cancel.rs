//! Cancellation: `mr.v1.cancel.<request_id>` notices (core NATS) set the flag the engine checks
//! after every token of that request, so it stops inside a running batch while the rest of the
//! batch goes on.
//!
//! A notice may arrive before its request reaches this process (queued in the batcher, or in
//! BATCHES): notices are remembered in the mesh's one [`CancelMemory`], and a request
//! registered later starts cancelled. Every replica hears every notice (no queue group): any of
//! them may hold the request.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use millrace_bus::CancelMemory;

/// Request id → cancel flag of the requests running here, and the notices remembered.
pub struct CancelRegistry {
    state: Mutex<State>,
}

struct State {
    in_flight: HashMap<String, Arc<AtomicBool>>,
    remembered: CancelMemory,
}

impl CancelRegistry {
    pub fn new(remembered: CancelMemory) -> Arc<Self> {
        Arc::new(Self { state: Mutex::new(State { in_flight: HashMap::new(), remembered }) })
    }

    /// Marks `request_id` as running here until the registration drops; its flag is already
    /// set when a notice for it is remembered.
    pub fn register(self: &Arc<Self>, request_id: &str) -> Registration {
        let mut state = self.state.lock().expect("cancel registry lock");
        let cancelled = state.remembered.contains(request_id, Instant::now());
        let flag = Arc::new(AtomicBool::new(cancelled));
        state.in_flight.insert(request_id.to_owned(), flag.clone());
        Registration { registry: self.clone(), request_id: request_id.to_owned(), flag }
    }

    /// Stops `request_id` if it runs here, and remembers the notice for a later registration
    /// (also covering a redelivery of a batch that held it).
    pub fn cancel(&self, request_id: &str) {
        let mut state = self.state.lock().expect("cancel registry lock");
        if let Some(flag) = state.in_flight.get(request_id) {
            flag.store(true, Ordering::Relaxed);
        }
        state.remembered.remember(request_id, Instant::now());
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
    use std::time::Duration;

    use super::*;

    fn is_set(r: &Registration) -> bool {
        r.flag().load(Ordering::Relaxed)
    }

    fn registry() -> Arc<CancelRegistry> {
        CancelRegistry::new(CancelMemory::new(Duration::from_secs(600), 1000))
    }

    #[test]
    fn a_cancel_sets_the_flag_of_the_running_request_only() {
        let registry = registry();
        let (a, b) = (registry.register("a"), registry.register("b"));
        registry.cancel("a");
        assert!(is_set(&a));
        assert!(!is_set(&b));
    }

    #[test]
    fn a_cancel_before_the_request_arrives_still_applies() {
        let registry = registry();
        registry.cancel("early");
        assert!(is_set(&registry.register("early")));
        assert!(!is_set(&registry.register("other")));
    }

    #[test]
    fn finished_requests_leave_the_registry() {
        let registry = registry();
        let first = registry.register("r");
        let redelivered = registry.register("r");
        drop(first);
        registry.cancel("r");
        assert!(is_set(&redelivered), "the live registration survives the old one's drop");
        drop(redelivered);
        assert!(registry.state.lock().unwrap().in_flight.is_empty());
    }
}
