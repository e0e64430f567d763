//! Test harness: a real `nats-server -js` on ports it picks itself, with its own store, or a
//! three-node JetStream cluster of them ([`NatsCluster`]); the service binaries as child
//! processes, restarted on fresh ports should one lose a port race; readiness waits and clean
//! teardown; and the helpers the services' tests share: the test's side of the bus ([`bus`]),
//! Prometheus metrics ([`metrics`]), a storing sink ([`sink`]) and the whole mesh ([`mesh`]).
//!
//! A test that cannot reach a real component it needs (PostgreSQL, the prepared models) says
//! `SKIPPED` and passes, unless [`REQUIRE_REAL`] is set: then it fails (see [`skip_or_fail`]).
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;

pub mod bus;
mod cluster;
pub mod mesh;
pub mod metrics;
mod nats;
mod service;
pub mod sink;

pub use cluster::{ClusterOptions, NatsCluster, Node};
pub use nats::{NatsOptions, NatsServer, nats_server_binary};
pub use service::{ServiceOptions, ServiceProcess, service_binary};

/// The environment variable that turns every skip into a failure: set it (to anything but
/// empty or `0`) where every real component must be there, as CI does.
pub const REQUIRE_REAL: &str = "MILLRACE_REQUIRE_REAL";

/// Whether [`REQUIRE_REAL`] is set: a skip is then a failure.
pub fn real_required() -> bool {
    required(std::env::var(REQUIRE_REAL).ok().as_deref())
}

fn required(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// What a test does when a real component it needs is not there: it says `SKIPPED <test>:
/// <why>` and the caller returns (the test passes), or, with [`REQUIRE_REAL`] set, it panics
/// with `why`. The one place that decides, so no skip can pass in CI unnoticed.
#[track_caller]
pub fn skip_or_fail(test: &str, why: &str) {
    if real_required() {
        panic!("{test} cannot run: {why} ({REQUIRE_REAL} is set: a skipped test is a failure)");
    }
    eprintln!("SKIPPED {test}: {why} (with {REQUIRE_REAL}=1 this fails)");
}

/// The workspace root (the folder holding `Cargo.lock`).
pub fn workspace_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("Cargo.lock").exists() {
        assert!(dir.pop(), "no Cargo.lock above {}", env!("CARGO_MANIFEST_DIR"));
    }
    dir
}

/// The prepared models' folder (`scripts/prepare-models.sh` fills it).
pub fn models_dir() -> PathBuf {
    workspace_root().join("models/prepared")
}

/// Polls `url` until it answers 2xx or `timeout` passes.
pub async fn wait_http_ok(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = Instant::now() + timeout;
    loop {
        match client.get(url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            outcome if Instant::now() > deadline => bail!("{url} not ready after {timeout:?}: {outcome:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The PostgreSQL URL for PostgreSQL tests (`MILLRACE_TEST_POSTGRES_URL`, which the test script
/// sets after starting a real server). `None`: the test is skipped, and says so; with
/// [`REQUIRE_REAL`] set this panics instead (see [`skip_or_fail`]).
#[track_caller]
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("MILLRACE_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            skip_or_fail(test, "no PostgreSQL (MILLRACE_TEST_POSTGRES_URL unset; scripts/test.sh starts one)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_set_non_zero_value_requires_the_real_components() {
        assert!(!required(None));
        assert!(!required(Some("")));
        assert!(!required(Some("0")));
        assert!(required(Some("1")));
        assert!(required(Some("yes")));
    }
}
