//! A one-for-one supervision tree on actix: the root supervisor is an actor; each child is a
//! future it spawns on the system's local set. A child that returns an error, panics or exits
//! while it should be running is restarted after an exponential backoff, without touching the
//! others or the process. More than `max_restarts` restarts within `window` escalate: the
//! process drains and exits non-zero so its orchestrator can restart it. Readiness is false
//! while any child is down or the process drains.
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics;

/// Restart policy and drain bound.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub max_restarts: u32,
    pub window: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub drain_timeout: Duration,
}

/// Which children are up, and whether the process is draining. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Readiness {
    children: Arc<Mutex<BTreeMap<&'static str, bool>>>,
    changes: watch::Sender<bool>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self { children: Default::default(), changes: watch::channel(false).0 }
    }
}

impl Readiness {
    fn set(&self, child: &'static str, up: bool) {
        let ready = {
            let mut children = self.children.lock().expect("readiness lock");
            children.insert(child, up);
            children.values().all(|up| *up)
        };
        self.changes.send_replace(ready);
        metrics::READY.set(ready.into());
    }

    fn draining(&self) {
        self.changes.send_replace(false);
        metrics::READY.set(0);
    }

    pub fn is_ready(&self) -> bool {
        *self.changes.borrow()
    }

    /// Follows readiness changes (for gRPC health).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    /// Each child and whether it is up.
    pub fn children(&self) -> BTreeMap<&'static str, bool> {
        self.children.lock().expect("readiness lock").clone()
    }
}

/// What a child gets each time it is started.
#[derive(Clone)]
pub struct ChildContext {
    pub name: &'static str,
    /// Cancelled when the process drains: stop taking work, finish what is running, return Ok.
    pub shutdown: CancellationToken,
    readiness: Readiness,
}

impl ChildContext {
    /// The child is serving (connected, bound, consuming).
    pub fn set_ready(&self) {
        self.readiness.set(self.name, true);
    }
}

type ChildFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>>>>;

/// How to start (and restart) one child.
pub struct ChildSpec {
    name: &'static str,
    start: Box<dyn Fn(ChildContext) -> ChildFuture>,
}

impl ChildSpec {
    pub fn new<F, Fut>(name: &'static str, start: F) -> Self
    where
        F: Fn(ChildContext) -> Fut + 'static,
        Fut: Future<Output = anyhow::Result<()>> + 'static,
    {
        Self { name, start: Box::new(move |ctx| Box::pin(start(ctx))) }
    }
}

struct Child {
    spec: Rc<ChildSpec>,
    running: bool,
    /// Bumped at each start so a late exit notice of an old incarnation is ignored.
    generation: u64,
    started: Instant,
    consecutive_failures: u32,
}

pub struct RootSupervisor {
    config: SupervisorConfig,
    children: Vec<Child>,
    readiness: Readiness,
    shutdown: CancellationToken,
    restarts: VecDeque<Instant>,
    exit_code: Option<i32>,
    done: Option<oneshot::Sender<i32>>,
}

#[derive(Message)]
#[rtype(result = "()")]
struct ChildExited {
    index: usize,
    generation: u64,
    outcome: Result<(), String>,
}

/// Begin draining (SIGTERM, SIGINT, or a test).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

impl RootSupervisor {
    /// Starts the tree on the current actix system. The receiver yields the process exit code
    /// once every child has stopped after a drain (0) or after escalation (non-zero).
    pub fn start(
        config: SupervisorConfig,
        specs: Vec<ChildSpec>,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> (Addr<Self>, oneshot::Receiver<i32>) {
        let (done, exited) = oneshot::channel();
        for spec in &specs {
            readiness.set(spec.name, false);
            // Shown at 0 from the start, so the first restart is an increase Prometheus sees.
            metrics::SUPERVISOR_RESTARTS.with_label_values(&[spec.name]);
        }
        let children = specs
            .into_iter()
            .map(|spec| Child {
                spec: Rc::new(spec),
                running: false,
                generation: 0,
                started: Instant::now(),
                consecutive_failures: 0,
            })
            .collect();
        let sup = Self {
            config,
            children,
            readiness,
            shutdown,
            restarts: VecDeque::new(),
            exit_code: None,
            done: Some(done),
        };
        (sup.start(), exited)
    }

    fn spawn_child(&mut self, index: usize, ctx: &mut Context<Self>) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let child = &mut self.children[index];
        child.generation += 1;
        child.running = true;
        child.started = Instant::now();
        let generation = child.generation;
        let name = child.spec.name;
        let child_ctx = ChildContext { name, shutdown: self.shutdown.child_token(), readiness: self.readiness.clone() };
        let work = (child.spec.start)(child_ctx);
        let supervisor = ctx.address();
        info!(child = name, generation, "starting child");
        actix_rt::spawn(async move {
            let outcome = match actix_rt::spawn(work).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(e) if e.is_panic() => Err(format!("panicked: {}", panic_message(e.into_panic()))),
                Err(e) => Err(format!("aborted: {e}")),
            };
            supervisor.do_send(ChildExited { index, generation, outcome });
        });
    }

    fn finish_if_all_stopped(&mut self) {
        if self.children.iter().all(|c| !c.running)
            && let Some(done) = self.done.take()
        {
            let _ = done.send(self.exit_code.unwrap_or(0));
        }
    }

    fn drain(&mut self, code: Option<i32>, ctx: &mut Context<Self>) {
        if self.exit_code.is_none() {
            self.exit_code = code;
        }
        if self.shutdown.is_cancelled() {
            return;
        }
        info!("draining");
        self.readiness.draining();
        self.shutdown.cancel();
        ctx.run_later(self.config.drain_timeout, |sup, _| {
            if let Some(done) = sup.done.take() {
                let stuck: Vec<_> = sup.children.iter().filter(|c| c.running).map(|c| c.spec.name).collect();
                error!(?stuck, "drain timed out");
                let _ = done.send(sup.exit_code.unwrap_or(1).max(1));
            }
        });
        self.finish_if_all_stopped();
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

impl Actor for RootSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        for index in 0..self.children.len() {
            self.spawn_child(index, ctx);
        }
    }
}

impl Handler<Drain> for RootSupervisor {
    type Result = ();
    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) {
        self.drain(None, ctx);
    }
}

impl Handler<ChildExited> for RootSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ChildExited, ctx: &mut Context<Self>) {
        let child = &mut self.children[msg.index];
        if msg.generation != child.generation {
            return;
        }
        child.running = false;
        let name = child.spec.name;
        self.readiness.set(name, false);
        if self.shutdown.is_cancelled() {
            match msg.outcome {
                Ok(()) => info!(child = name, "child stopped"),
                Err(e) => warn!(child = name, error = %e, "child failed while draining"),
            }
            self.finish_if_all_stopped();
            return;
        }
        let reason = msg.outcome.err().unwrap_or_else(|| "exited while it should be running".into());
        // A child that stayed up a whole window starts its backoff afresh.
        if child.started.elapsed() > self.config.window {
            child.consecutive_failures = 0;
        }
        let backoff = self
            .config
            .backoff_base
            .saturating_mul(2u32.saturating_pow(child.consecutive_failures))
            .min(self.config.backoff_max);
        child.consecutive_failures += 1;

        let now = Instant::now();
        self.restarts.push_back(now);
        while self.restarts.front().is_some_and(|t| now.duration_since(*t) > self.config.window) {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u32 > self.config.max_restarts {
            error!(child = name, %reason, max_restarts = self.config.max_restarts, window = ?self.config.window,
                "restart intensity exceeded: shutting the process down");
            self.drain(Some(1), ctx);
            return;
        }
        warn!(child = name, %reason, ?backoff, "child failed; restarting");
        metrics::SUPERVISOR_RESTARTS.with_label_values(&[name]).inc();
        let index = msg.index;
        ctx.run_later(backoff, move |sup, ctx| sup.spawn_child(index, ctx));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn config(max_restarts: u32) -> SupervisorConfig {
        SupervisorConfig {
            max_restarts,
            window: Duration::from_secs(10),
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(10),
            drain_timeout: Duration::from_secs(5),
        }
    }

    /// A child that panics on its first `failures` starts, then serves until drained.
    fn flaky(starts: Arc<AtomicU32>, failures: u32) -> ChildSpec {
        ChildSpec::new("flaky", move |ctx| {
            let n = starts.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < failures {
                    panic!("injected fault {n}");
                }
                ctx.set_ready();
                ctx.shutdown.cancelled().await;
                Ok(())
            }
        })
    }

    fn steady(stops: Arc<AtomicU32>) -> ChildSpec {
        ChildSpec::new("steady", move |ctx| {
            let stops = stops.clone();
            async move {
                ctx.set_ready();
                ctx.shutdown.cancelled().await;
                stops.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    }

    #[actix_rt::test]
    async fn a_panicking_child_is_restarted_alone_and_drain_exits_zero() {
        let starts = Arc::new(AtomicU32::new(0));
        let stops = Arc::new(AtomicU32::new(0));
        let readiness = Readiness::default();
        let (sup, exited) = RootSupervisor::start(
            config(5),
            vec![flaky(starts.clone(), 3), steady(stops.clone())],
            readiness.clone(),
            CancellationToken::new(),
        );
        let mut ready = readiness.subscribe();
        tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r)).await.unwrap().unwrap();
        assert_eq!(starts.load(Ordering::SeqCst), 4, "three panics, three restarts");
        assert_eq!(stops.load(Ordering::SeqCst), 0, "the sibling was never restarted");
        sup.do_send(Drain);
        assert_eq!(exited.await.unwrap(), 0);
        assert!(!readiness.is_ready());
        assert_eq!(stops.load(Ordering::SeqCst), 1);
    }

    #[actix_rt::test]
    async fn exceeding_the_restart_intensity_exits_non_zero() {
        let starts = Arc::new(AtomicU32::new(0));
        let stops = Arc::new(AtomicU32::new(0));
        let (_sup, exited) = RootSupervisor::start(
            config(2),
            vec![flaky(starts.clone(), u32::MAX), steady(stops.clone())],
            Readiness::default(),
            CancellationToken::new(),
        );
        let code = tokio::time::timeout(Duration::from_secs(5), exited).await.unwrap().unwrap();
        assert_eq!(code, 1);
        assert_eq!(starts.load(Ordering::SeqCst), 3, "first start plus two restarts");
        assert_eq!(stops.load(Ordering::SeqCst), 1, "siblings drained before exit");
    }

    #[actix_rt::test]
    async fn an_erroring_child_is_restarted_with_growing_backoff() {
        let starts = Arc::new(AtomicU32::new(0));
        let counter = starts.clone();
        let spec = ChildSpec::new("erroring", move |ctx| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 4 {
                    anyhow::bail!("transient {n}");
                }
                ctx.set_ready();
                ctx.shutdown.cancelled().await;
                Ok(())
            }
        });
        let mut cfg = config(10);
        cfg.backoff_base = Duration::from_millis(20);
        cfg.backoff_max = Duration::from_secs(1);
        let readiness = Readiness::default();
        let t0 = Instant::now();
        let (sup, exited) = RootSupervisor::start(cfg, vec![spec], readiness.clone(), CancellationToken::new());
        let mut ready = readiness.subscribe();
        tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r)).await.unwrap().unwrap();
        // 20 + 40 + 80 + 160 ms of backoff before the fifth start.
        assert!(t0.elapsed() >= Duration::from_millis(300), "{:?}", t0.elapsed());
        // No other test names a child "erroring": the process-wide counter is this test's.
        assert_eq!(metrics::SUPERVISOR_RESTARTS.with_label_values(&["erroring"]).get(), 4);
        sup.do_send(Drain);
        assert_eq!(exited.await.unwrap(), 0);
    }
}
