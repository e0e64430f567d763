//! The generation loops: each generator session is owned by one OS thread running the engine's
//! iteration-level [`Scheduler`] (an ONNX Runtime session runs with `&mut`, and a step blocks
//! for the length of a forward pass). Requests reach a loop through a channel and hear back
//! through their own: every piece as it is made, then the one outcome. The bus stage and the
//! gRPC API submit to the same loops, so a direct call joins the running set like any other.
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc as std_mpsc};

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

/// A loop's sequences as its clients see them, counted live (a step streams pieces before it
/// returns, so a snapshot between steps would lag what clients have already seen).
#[derive(Default)]
struct Occupancy {
    /// Submitted, no token yet: queued in the channel, waiting, or being prefilled.
    waiting: AtomicUsize,
    /// Streaming tokens, not yet finished.
    running: AtomicUsize,
}

/// One generator's loop thread and what it reports.
struct Worker {
    submissions: std_mpsc::Sender<Submission>,
    occupancy: Arc<Occupancy>,
    /// The scheduler's own figures (KV use, prefix cache), published after each step.
    load: watch::Receiver<Load>,
}

/// Every generator's loop; [`Self::submit`] picks the least loaded.
pub struct GenerationLoops {
    workers: Vec<Worker>,
    /// Wakes whoever reports capacity when any loop's load changes.
    changed: Arc<watch::Sender<()>>,
}

impl GenerationLoops {
    /// Starts one loop per generator.
    pub fn start(
        generators: Vec<Generator>,
        config: SchedulerConfig,
    ) -> Result<Arc<Self>, millrace_engine::EngineError> {
        let changed = Arc::new(watch::channel(()).0);
        let mut workers = Vec::new();
        for (n, generator) in generators.into_iter().enumerate() {
            let scheduler = Scheduler::new(generator, config)?;
            let (submissions, received) = std_mpsc::channel();
            let occupancy = Arc::new(Occupancy::default());
            let (load_tx, load) = watch::channel(scheduler.load());
            let listeners =
                Listeners { by_id: HashMap::new(), next_id: 0, occupancy: occupancy.clone(), changed: changed.clone() };
            std::thread::Builder::new()
                .name(format!("generation-{n}"))
                .spawn(move || run(scheduler, received, listeners, load_tx))
                .expect("spawning a generation thread");
            workers.push(Worker { submissions, occupancy, load });
        }
        Ok(Arc::new(Self { workers, changed }))
    }

    /// Queues `request` on the loop with the fewest sequences; its updates come on the receiver.
    pub fn submit(&self, request: GenerationRequest) -> mpsc::UnboundedReceiver<Update> {
        let (updates, received) = mpsc::unbounded_channel();
        let occupied =
            |w: &Worker| w.occupancy.waiting.load(Ordering::Relaxed) + w.occupancy.running.load(Ordering::Relaxed);
        let worker = self.workers.iter().min_by_key(|w| occupied(w)).expect("at least one generator");
        worker.occupancy.waiting.fetch_add(1, Ordering::Relaxed);
        if worker.submissions.send(Submission { request, updates: updates.clone() }).is_err() {
            worker.occupancy.waiting.fetch_sub(1, Ordering::Relaxed);
            let _ = updates.send(Update::Done(Err("the generation loop has stopped".into())));
        }
        self.changed.send_replace(());
        received
    }

    /// The loops' load together.
    pub fn load(&self) -> Load {
        self.workers.iter().fold(Load::default(), |sum, w| {
            let load = *w.load.borrow();
            Load {
                running: sum.running + w.occupancy.running.load(Ordering::Relaxed),
                waiting: sum.waiting + w.occupancy.waiting.load(Ordering::Relaxed),
                max_running: sum.max_running + load.max_running,
                kv_budget_tokens: sum.kv_budget_tokens + load.kv_budget_tokens,
                kv_used_tokens: sum.kv_used_tokens + load.kv_used_tokens,
                prefix_cache_tokens: sum.prefix_cache_tokens + load.prefix_cache_tokens,
            }
        })
    }

    /// Changes whenever a loop's load may have changed.
    pub fn watch(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }
}

/// A loop: takes submissions, steps while there is work, sleeps on the channel when idle.
fn run(
    mut scheduler: Scheduler,
    submissions: std_mpsc::Receiver<Submission>,
    mut listeners: Listeners,
    load: watch::Sender<Load>,
) {
    loop {
        if scheduler.is_idle() {
            match submissions.recv() {
                Ok(s) => listeners.take(&mut scheduler, s),
                Err(_) => return,
            }
        }
        while let Ok(s) = submissions.try_recv() {
            listeners.take(&mut scheduler, s);
        }
        match scheduler.step(|id, event| listeners.tell(id, event)) {
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
            listeners.changed.send_replace(());
        }
    }
}

/// Who hears about each sequence of a loop, and the loop's live occupancy.
struct Listeners {
    /// Each sequence's listener, and whether it has had a token (is running).
    by_id: HashMap<SequenceId, (mpsc::UnboundedSender<Update>, bool)>,
    next_id: SequenceId,
    occupancy: Arc<Occupancy>,
    changed: Arc<watch::Sender<()>>,
}

impl Listeners {
    fn take(&mut self, scheduler: &mut Scheduler, submission: Submission) {
        self.next_id += 1;
        match scheduler.submit(self.next_id, submission.request) {
            Ok(()) => {
                self.by_id.insert(self.next_id, (submission.updates, false));
            }
            Err(e) => {
                self.occupancy.waiting.fetch_sub(1, Ordering::Relaxed);
                let _ = submission.updates.send(Update::Done(Err(e.to_string())));
            }
        }
    }

    fn tell(&mut self, id: SequenceId, event: Event<'_>) {
        match event {
            Event::Piece(piece) => {
                let Some((listener, running)) = self.by_id.get_mut(&id) else { return };
                if !*running {
                    *running = true;
                    self.occupancy.waiting.fetch_sub(1, Ordering::Relaxed);
                    self.occupancy.running.fetch_add(1, Ordering::Relaxed);
                    self.changed.send_replace(());
                }
                // A listener that has gone cancelled its request (or will): nothing to tell.
                let _ = listener.send(Update::Piece(piece.to_owned()));
            }
            Event::Finished(generation) => {
                metrics::GENERATIONS.with_label_values(&[generation.finish.as_str()]).inc();
                self.finish(id, Ok(generation));
            }
        }
    }

    fn finish(&mut self, id: SequenceId, outcome: Result<Generation, String>) {
        let Some((listener, running)) = self.by_id.remove(&id) else {
            return warn!(id, "a sequence ended that nobody waits for");
        };
        let counter = if running { &self.occupancy.running } else { &self.occupancy.waiting };
        counter.fetch_sub(1, Ordering::Relaxed);
        self.changed.send_replace(());
        let _ = listener.send(Update::Done(outcome));
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
