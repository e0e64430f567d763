//! The readiness gauge and the restart counter as `/metrics` exports them, following a real
//! supervision tree (its own test binary: the gauge is process-wide).
use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace_runtime::supervisor::{Drain, RootSupervisor};
use millrace_runtime::{ChildSpec, Readiness, SupervisorConfig};
use millrace_testkit::metrics::metric;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

fn exported() -> String {
    prometheus::TextEncoder::new().encode_to_string(&prometheus::gather()).expect("metrics encode")
}

async fn wait_exported(name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&exported(), name, labels) != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {:?}, expected {want}",
            metric(&exported(), name, labels)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix_rt::test]
async fn ready_is_one_only_while_every_child_is_up_and_restarts_are_counted() {
    let config = SupervisorConfig {
        max_restarts: 5,
        window: Duration::from_secs(10),
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(10),
        drain_timeout: Duration::from_secs(5),
    };
    // Fails once, then waits for the test's go before it reports ready.
    let go = Arc::new(Notify::new());
    let starts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let child = ChildSpec::new("gated", {
        let (go, starts) = (go.clone(), starts.clone());
        move |ctx| {
            let (go, first) = (go.clone(), starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0);
            async move {
                anyhow::ensure!(!first, "fails on its first start");
                go.notified().await;
                ctx.set_ready();
                ctx.shutdown.cancelled().await;
                Ok(())
            }
        }
    });
    let readiness = Readiness::default();
    let (supervisor, exited) = RootSupervisor::start(config, vec![child], readiness.clone(), CancellationToken::new());
    let gated = [("child", "gated")];
    wait_exported("millrace_supervisor_restarts_total", &gated, 1.0).await;
    assert_eq!(metric(&exported(), "millrace_ready", &[]), Some(0.0), "restarted, not ready yet");

    go.notify_one();
    wait_exported("millrace_ready", &[], 1.0).await;

    supervisor.do_send(Drain);
    wait_exported("millrace_ready", &[], 0.0).await;
    assert_eq!(exited.await.unwrap(), 0);
    assert_eq!(metric(&exported(), "millrace_supervisor_restarts_total", &gated), Some(1.0));
    assert!(metric(&exported(), "process_start_time_seconds", &[]).is_some(), "the process collector is on");
}
