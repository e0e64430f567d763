//! The generation loops: each generator session is owned by one OS thread running the engine's
//! iteration-level [`Scheduler`] (an ONNX Runtime session runs with `&mut`, and a step blocks
//! for the length of a forward pass). Requests reach a loop through a channel and hear back
//! through their own: every piece as it is made, then the one outcome. The bus stage and the
//! gRPC API submit to the same loops, so a direct call joins the running set like any other.
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc as std_mpsc};
use std::thread::JoinHandle;

use millrace_engine::{
    Event, Generation, GenerationRequest, Generator, Load, Scheduler, SchedulerConfig, SequenceId, StepReport,
};
use tokio::sync::{mpsc, watch};
use tracing::{error, warn};

use crate::metrics;

/// What a submitted request hears.
#[derive(Debug)]
pub enum Update {
    Piece(String),
    /// The last update: the generation, or why the engine could not produce it.
    Done(Result<Generation, String>),
}

struct Submission {
    request: GenerationRequest,
    updates: mpsc::UnboundedSender<Update>,
}

/// One generator's loop thread and what it reports.
struct Worker {
    submissions: std_mpsc::Sender<Submission>,
    /// Submitted, not yet taken in by the loop (it takes them at the start of each step).
    queued: Arc<AtomicUsize>,
    load: watch::Receiver<Load>,
}

/// Every generator's loop; [`Self::submit`] picks the least loaded.
pub struct GenerationLoops {
    workers: Vec<Worker>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Wakes whoever reports capacity when any loop's load changes.
    changed: watch::Sender<()>,
}

impl GenerationLoops {
    /// Starts one loop per generator.
    pub fn start(
        generators: Vec<Generator>,
        config: SchedulerConfig,
    ) -> Result<Arc<Self>, millrace_engine::EngineError> {
        let (changed, _) = watch::channel(());
        let mut workers = Vec::new();
        let mut threads = Vec::new();
        for (n, generator) in generators.into_iter().enumerate() {
            let scheduler = Scheduler::new(generator, config)?;
            let (submissions, received) = std_mpsc::channel();
            let queued = Arc::new(AtomicUsize::new(0));
            let (load_tx, load) = watch::channel(scheduler.load());
            let (thread_queued, thread_changed) = (queued.clone(), changed.clone());
            let thread = std::thread::Builder::new()
                .name(format!("generation-{n}"))
                .spawn(move || run(scheduler, received, thread_queued, load_tx, thread_changed))
                .expect("spawning a generation thread");
            workers.push(Worker { submissions, queued, load });
            threads.push(thread);
        }
        Ok(Arc::new(Self { workers, threads: Mutex::new(threads), changed }))
    }

    /// Queues `request` on the loop with the fewest sequences; its updates come on the receiver.
    pub fn submit(&self, request: GenerationRequest) -> mpsc::UnboundedReceiver<Update> {
        let (updates, received) = mpsc::unbounded_channel();
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| {
                let load = w.load.borrow();
                load.running + load.waiting + w.queued.load(Ordering::Relaxed)
            })
            .expect("at least one generator");
        worker.queued.fetch_add(1, Ordering::Relaxed);
        if worker.submissions.send(Submission { request, updates: updates.clone() }).is_err() {
            worker.queued.fetch_sub(1, Ordering::Relaxed);
            let _ = updates.send(Update::Done(Err("the generation loop has stopped".into())));
        }
        self.changed.send_replace(());
        received
    }

    /// The loops' load together: sequences queued in a loop's channel count as waiting.
    pub fn load(&self) -> Load {
        self.workers.iter().fold(
            Load {
                running: 0,
                waiting: 0,
                max_running: 0,
                kv_budget_tokens: 0,
                kv_used_tokens: 0,
                prefix_cache_tokens: 0,
            },
            |sum, w| {
                let load = *w.load.borrow();
                Load {
                    running: sum.running + load.running,
                    waiting: sum.waiting + load.waiting + w.queued.load(Ordering::Relaxed),
                    max_running: sum.max_running + load.max_running,
                    kv_budget_tokens: sum.kv_budget_tokens + load.kv_budget_tokens,
                    kv_used_tokens: sum.kv_used_tokens + load.kv_used_tokens,
                    prefix_cache_tokens: sum.prefix_cache_tokens + load.prefix_cache_tokens,
                }
            },
        )
    }

    /// Changes whenever a loop's load may have changed.
    pub fn watch(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Whether every loop thread still runs (a panic in the engine ends one).
    pub fn alive(&self) -> bool {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner).iter().all(|t| !t.is_finished())
    }
}

/// A loop: takes submissions, steps while there is work, sleeps on the channel when idle.
fn run(
    mut scheduler: Scheduler,
    submissions: std_mpsc::Receiver<Submission>,
    queued: Arc<AtomicUsize>,
    load: watch::Sender<Load>,
    changed: watch::Sender<()>,
) {
    let mut listeners = Listeners { by_id: HashMap::new(), next_id: 0 };
    loop {
        if scheduler.is_idle() {
            match submissions.recv() {
                Ok(s) => listeners.take(&mut scheduler, s, &queued),
                Err(_) => return,
            }
        }
        while let Ok(s) = submissions.try_recv() {
            listeners.take(&mut scheduler, s, &queued);
        }
        let stepped = scheduler.step(|id, event| listeners.tell(id, event));
        match stepped {
            Ok(report) => record(&report),
            Err(e) => {
                error!(error = %e, "generation step failed: every sequence of this loop is answered with the error");
                for id in scheduler.abort_all() {
                    listeners.finish(id, Err(format!("engine: {e}")));
                }
            }
        }
        let now = scheduler.load();
        if *load.borrow() != now {
            load.send_replace(now);
            changed.send_replace(());
        }
    }
}

/// Who hears about each sequence of a loop.
struct Listeners {
    by_id: HashMap<SequenceId, mpsc::UnboundedSender<Update>>,
    next_id: SequenceId,
}

impl Listeners {
    fn take(&mut self, scheduler: &mut Scheduler, submission: Submission, queued: &AtomicUsize) {
        queued.fetch_sub(1, Ordering::Relaxed);
        self.next_id += 1;
        match scheduler.submit(self.next_id, submission.request) {
            Ok(()) => {
                self.by_id.insert(self.next_id, submission.updates);
            }
            Err(e) => {
                let _ = submission.updates.send(Update::Done(Err(e.to_string())));
            }
        }
    }

    fn tell(&mut self, id: SequenceId, event: Event<'_>) {
        match event {
            // A listener that has gone cancelled its request (or will): nothing to tell.
            Event::Piece(piece) => {
                if let Some(l) = self.by_id.get(&id) {
                    let _ = l.send(Update::Piece(piece.to_owned()));
                }
            }
            Event::Finished(generation) => {
                metrics::GENERATIONS.with_label_values(&[generation.finish.as_str()]).inc();
                self.finish(id, Ok(generation));
            }
        }
    }

    fn finish(&mut self, id: SequenceId, outcome: Result<Generation, String>) {
        match self.by_id.remove(&id) {
            Some(l) => {
                let _ = l.send(Update::Done(outcome));
            }
            None => warn!(id, "a sequence ended that nobody waits for"),
        }
    }
}

fn record(report: &StepReport) {
    metrics::STEP_SECONDS.observe(report.elapsed.as_secs_f64());
    metrics::TOKENS.with_label_values(&["prefill"]).inc_by(report.prefill_tokens as u64);
    metrics::TOKENS.with_label_values(&["decode"]).inc_by(report.decoded as u64);
    metrics::TOKENS.with_label_values(&["prefix_reused"]).inc_by(report.cached_tokens as u64);
    metrics::ADMITTED.inc_by(report.admitted as u64);
    metrics::PREFIX_HITS.inc_by(report.prefix_hits as u64);
    if report.decoded > 0 {
        metrics::DECODE_BATCH.observe(report.decoded as f64);
    }
}
