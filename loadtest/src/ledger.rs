//! The ledger check: every request the mesh accepted has exactly one terminal row in the sink,
//! and the sink holds no row for this run's users that the harness did not see accepted. A sink
//! that cannot be read fails the check (every accepted request counts as missing): a ledger that
//! cannot be verified has not passed.
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use crate::sink::{SinkClient, SinkError, SinkRow};

/// How many ids of each kind of discrepancy the report lists.
const SAMPLE_IDS: usize = 10;
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Concurrent single-row look-ups while settling.
const LOOKUPS_IN_FLIGHT: usize = 16;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ledger {
    /// Request ids the harness saw accepted.
    pub accepted: usize,
    /// Rows the sink holds for this run's users.
    pub rows: usize,
    /// Accepted ids without a row.
    pub missing: Discrepancy,
    /// Ids with more than one row (counted once per extra row).
    pub duplicates: Discrepancy,
    /// Rows whose id the harness never saw accepted: accepted by the mesh while the client
    /// failed or gave up before reading the acceptance. Reported, but not a failure of the mesh.
    pub unknown: Discrepancy,
    /// Why the sink's rows could not be read (`sink unreachable at …`, `sink unreadable: …`),
    /// when the last attempt before the timeout failed. The rows of the last complete listing,
    /// if any, are the ones counted; the check fails.
    pub sink_error: Option<String>,
    /// No missing and no duplicate rows, and the sink could be read.
    pub passed: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Discrepancy {
    pub count: usize,
    /// The first few ids, sorted.
    pub sample: Vec<String>,
}

impl Discrepancy {
    fn from_ids(mut ids: Vec<&str>, count: usize) -> Self {
        ids.sort_unstable();
        Self { count, sample: ids.into_iter().take(SAMPLE_IDS).map(str::to_owned).collect() }
    }
}

/// Compares the accepted ids with the rows the sink listed for the run's users.
pub fn reconcile(accepted: &HashSet<String>, rows: &[SinkRow]) -> Ledger {
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for row in rows {
        *per_id.entry(row.request_id.as_str()).or_default() += 1;
    }
    let missing: Vec<&str> = accepted.iter().map(String::as_str).filter(|id| !per_id.contains_key(id)).collect();
    let duplicated: Vec<(&str, usize)> = per_id.iter().filter(|(_, n)| **n > 1).map(|(id, n)| (*id, *n)).collect();
    let unknown: Vec<&str> = per_id.keys().copied().filter(|id| !accepted.contains(*id)).collect();

    let missing_count = missing.len();
    let extra_rows = duplicated.iter().map(|(_, n)| n - 1).sum();
    let unknown_count = unknown.len();
    Ledger {
        accepted: accepted.len(),
        rows: rows.len(),
        passed: missing_count == 0 && extra_rows == 0,
        missing: Discrepancy::from_ids(missing, missing_count),
        duplicates: Discrepancy::from_ids(duplicated.into_iter().map(|(id, _)| id).collect(), extra_rows),
        unknown: Discrepancy::from_ids(unknown, unknown_count),
        sink_error: None,
    }
}

/// Every row of `users`, or the first error.
async fn list_all(sink: &SinkClient, users: &[String]) -> Result<Vec<SinkRow>, SinkError> {
    let mut rows = Vec::new();
    for user in users {
        rows.extend(sink.list_user(user).await?);
    }
    Ok(rows)
}

/// Lists every row of `users`, again and again until every accepted id has one or `deadline`
/// passes (the sink commits in batches, and streams end before their row is stored), then
/// reconciles. A sink that cannot be read is asked again until `deadline` too (it may be
/// restarting); if the last attempt failed, the ledger says why and fails. Returns the ledger
/// and the rows it was drawn from.
pub async fn check(
    sink: &SinkClient,
    users: &[String],
    accepted: &HashSet<String>,
    deadline: Instant,
) -> (Ledger, Vec<SinkRow>) {
    // The last complete listing: still the best count if the sink fails afterwards.
    let mut listed = Vec::new();
    let mut reported_error = false;
    loop {
        let out_of_time = Instant::now() + POLL_EVERY > deadline;
        match list_all(sink, users).await {
            Ok(rows) => {
                let ledger = reconcile(accepted, &rows);
                if ledger.missing.count == 0 || out_of_time {
                    return (ledger, rows);
                }
                listed = rows;
            }
            Err(error) => {
                let error = error.describe(sink.base_url());
                if out_of_time {
                    let mut ledger = reconcile(accepted, &listed);
                    ledger.sink_error = Some(error);
                    ledger.passed = false;
                    return (ledger, listed);
                }
                if !std::mem::replace(&mut reported_error, true) {
                    eprintln!("ledger: {error}; asking again until the ledger timeout");
                }
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// What [`settle`] left open.
#[derive(Debug, Default)]
pub struct Unsettled {
    /// Ids still without a terminal row (or whose row could not be read) at the deadline.
    pub request_ids: Vec<String>,
    /// The sink's error in the last round, if a look-up failed then.
    pub sink_error: Option<String>,
}

/// Waits until each of `request_ids` has its terminal row or `deadline` passes; returns those
/// still without one. Used between phases so that requests a phase gave up on are over in the
/// mesh before the next phase measures it. A look-up that fails counts as no row yet: the
/// ledger check at the end is where an unreadable sink fails the run.
pub async fn settle(sink: &SinkClient, mut request_ids: Vec<String>, deadline: Instant) -> Unsettled {
    let mut sink_error = None;
    while !request_ids.is_empty() {
        let looked_up: Vec<(&String, Result<Option<SinkRow>, SinkError>)> = futures::stream::iter(&request_ids)
            .map(|id| async move { (id, sink.get(id).await) })
            .buffer_unordered(LOOKUPS_IN_FLIGHT)
            .collect()
            .await;
        sink_error = None;
        let mut found = HashSet::new();
        for (id, result) in looked_up {
            match result {
                Ok(Some(_)) => {
                    found.insert(id.clone());
                }
                Ok(None) => {}
                Err(error) => sink_error = Some(error.describe(sink.base_url())),
            }
        }
        request_ids.retain(|id| !found.contains(id));
        if request_ids.is_empty() || Instant::now() + POLL_EVERY > deadline {
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    Unsettled { request_ids, sink_error }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> SinkRow {
        SinkRow {
            request_id: id.into(),
            user: "u".into(),
            status: millrace_proto::v1::TerminalStatus::Completed,
            timings: vec![],
            stored_unix_ms: 0,
        }
    }

    fn ids(list: &[&str]) -> HashSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_row_per_accepted_id_passes() {
        let ledger = reconcile(&ids(&["a", "b"]), &[row("b"), row("a")]);
        assert!(ledger.passed);
        assert_eq!((ledger.accepted, ledger.rows), (2, 2));
        assert_eq!((ledger.missing.count, ledger.duplicates.count, ledger.unknown.count), (0, 0, 0));
    }

    #[test]
    fn missing_duplicate_and_unknown_rows_are_counted_with_samples() {
        let rows = [row("a"), row("a"), row("a"), row("c"), row("x")];
        let ledger = reconcile(&ids(&["a", "b", "c", "d"]), &rows);
        assert!(!ledger.passed);
        assert_eq!(ledger.missing, Discrepancy { count: 2, sample: vec!["b".into(), "d".into()] });
        assert_eq!(ledger.duplicates, Discrepancy { count: 2, sample: vec!["a".into()] });
        assert_eq!(ledger.unknown, Discrepancy { count: 1, sample: vec!["x".into()] });
    }

    #[test]
    fn unknown_rows_alone_do_not_fail_the_check() {
        let ledger = reconcile(&ids(&["a"]), &[row("a"), row("z")]);
        assert!(ledger.passed);
        assert_eq!(ledger.unknown.count, 1);
    }

    /// A port nothing listens on: connections to it are refused (a sink that is down).
    fn closed_port_sink() -> SinkClient {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        SinkClient::new(&format!("http://127.0.0.1:{port}")).unwrap()
    }

    #[tokio::test]
    async fn a_sink_that_refuses_connections_fails_the_check_and_says_so() {
        let sink = closed_port_sink();
        let deadline = Instant::now() + Duration::from_millis(600);
        let (ledger, rows) = check(&sink, &["u".into()], &ids(&["a", "b"]), deadline).await;
        assert!(rows.is_empty());
        assert!(!ledger.passed);
        assert_eq!((ledger.accepted, ledger.rows, ledger.missing.count), (2, 0, 2));
        let error = ledger.sink_error.expect("the reason");
        assert!(error.starts_with("sink unreachable at http://127.0.0.1:"), "{error}");
        assert!(error.to_lowercase().contains("refused"), "{error}");

        // Nothing accepted, but nothing could be verified either: still a failure.
        let (ledger, _) = check(&sink, &["u".into()], &ids(&[]), Instant::now()).await;
        assert!(!ledger.passed && ledger.sink_error.is_some(), "{ledger:?}");

        let left = settle(&sink, vec!["a".into()], Instant::now()).await;
        assert_eq!(left.request_ids, ["a"]);
        assert!(left.sink_error.is_some_and(|e| e.starts_with("sink unreachable")));
    }

    #[test]
    fn samples_are_capped() {
        let accepted: HashSet<String> = (0..50).map(|i| format!("id{i:02}")).collect();
        let ledger = reconcile(&accepted, &[]);
        assert_eq!(ledger.missing.count, 50);
        assert_eq!(ledger.missing.sample.len(), SAMPLE_IDS);
        assert_eq!(ledger.missing.sample[0], "id00");
    }
}
