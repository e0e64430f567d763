//! The `cluster` schedule, as CI runs it where Docker is: NATS as three containers on a private
//! network with R3 streams, the services as processes on the host given the three URLs, load
//! with idempotent retries; `docker kill` of the node leading the most streams, then one node
//! cut off the network and healed; then every invariant (every accepted id one terminal row,
//! nothing stored twice) and the stall and recovery times in the report. Without Docker, the
//! NATS image (`MILLRACE_NATS_IMAGE` or `scripts/images.sh nats`), the service binaries or the
//! prepared model it says SKIPPED, and fails instead under `MILLRACE_REQUIRE_REAL=1`.
use clap::Parser;
use millrace_chaos::config::Config;

// Ignored until the defect it found is fixed (issue 14 stays open for it): on 2026-12-04 it
// passed three runs, then failed two — 36 of 231 and 6 of 185 accepted requests had no terminal
// row 180 s after the load stopped (requests accepted just before the leader kill, and after
// the partition), while session and moderation saw 105–132 and 40 redeliveries. Suspected, not
// verified: messages that exhausted max_deliver during the fault whose MAX_DELIVERIES advisory
// never reached the dead-letter listener. Run it with
// `cargo test -p millrace-chaos --test cluster -- --ignored --nocapture`.
#[ignore = "finds accepted requests without a terminal row after a leader kill or partition (issue 14, open)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_schedule_loses_nothing_when_a_node_dies_or_is_cut_off() {
    let test = "the_cluster_schedule_loses_nothing_when_a_node_dies_or_is_cut_off";
    // Flags as the binary takes them; MILLRACE_CHAOS_* variables apply too.
    let config = Config::parse_from(["chaos", "--schedule=cluster"]);
    if let Err(why) = millrace_chaos::preflight(&config) {
        millrace_testkit::skip_or_fail(test, &why);
        return;
    }
    let report = millrace_chaos::run(config).await.expect("the chaos run is carried out");
    let failed: Vec<String> =
        report.checks.iter().filter(|c| !c.passed).map(|c| format!("FAIL {}: {}", c.name, c.detail)).collect();
    eprintln!("{}", report.markdown());
    assert!(report.passed, "{} invariants failed:\n{}\n\n{}", failed.len(), failed.join("\n"), report.markdown());
    for fault in &report.faults {
        assert!(fault.error.is_none(), "{}: {:?}", fault.name, fault.error);
        assert!(fault.leaders_moved_s.is_some(), "{}: the streams found new leaders", fault.name);
        assert!(fault.rejoined_s.is_some(), "{}: every replica current again", fault.name);
    }
}
