//! Policy reloads without a restart: on SIGHUP, and when the policy file's modification time or
//! length changes (checked every `--policy-poll-ms`). Each attempt logs one line; a refused
//! policy leaves the one in force.
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::moderator::PolicyStore;

/// Follows SIGHUP and the file until `shutdown`. `on_ready` is called once the signal handler
/// is installed (SIGHUP would otherwise end the process).
pub async fn watch(
    store: Arc<PolicyStore>,
    poll: Option<Duration>,
    shutdown: CancellationToken,
    on_ready: impl Fn(),
) -> std::io::Result<()> {
    let mut hangups = signal(SignalKind::hangup())?;
    on_ready();
    // Without a file there is nothing to poll; SIGHUP is still taken (and logged).
    let poll = poll.filter(|_| store.path().is_some());
    let mut ticks = tokio::time::interval(poll.unwrap_or(Duration::from_secs(3600)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = hangups.recv() => {
                let store = store.clone();
                let _ = tokio::task::spawn_blocking(move || store.reload_and_log("SIGHUP")).await;
            }
            _ = ticks.tick(), if poll.is_some() => {
                if store.file_changed() {
                    let store = store.clone();
                    let _ = tokio::task::spawn_blocking(move || store.reload_and_log("file changed")).await;
                }
            }
        }
    }
}
