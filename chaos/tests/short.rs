//! The short chaos schedule, as CI runs it: the mesh as processes on file-backed streams,
//! load with idempotent retries, every fault once, then every invariant (see chaos/README.md).
//! Without nats-server, the service binaries or the prepared model it says SKIPPED, and fails
//! instead under `MILLRACE_REQUIRE_REAL=1`.
use clap::Parser;
use millrace_chaos::config::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_short_schedule_keeps_every_invariant() {
    let test = "the_short_schedule_keeps_every_invariant";
    // Flags as the binary takes them; MILLRACE_CHAOS_* variables apply too.
    let config = Config::parse_from(["chaos", "--schedule=short"]);
    if let Err(why) = millrace_chaos::preflight(&config) {
        millrace_testkit::skip_or_fail(test, &why);
        return;
    }
    let report = millrace_chaos::run(config).await.expect("the chaos run is carried out");
    let failed: Vec<String> =
        report.checks.iter().filter(|c| !c.passed).map(|c| format!("FAIL {}: {}", c.name, c.detail)).collect();
    assert!(report.passed, "{} invariants failed:\n{}\n\n{}", failed.len(), failed.join("\n"), report.markdown());
}
