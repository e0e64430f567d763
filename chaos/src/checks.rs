//! The invariants, each a named pass/fail line with its evidence.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use async_nats::jetstream;
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use crate::audit::OriginCount;
use crate::db::{DeadLetter, ResultRow};
use crate::faults::Poison;
use crate::load::{KeyRecord, Resubmit};

/// One invariant's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    /// One line: what was found.
    pub detail: String,
    /// The evidence: ids, counts (bounded).
    pub evidence: Value,
}

impl Check {
    pub fn new(name: &str, passed: bool, detail: String, evidence: Value) -> Check {
        Check { name: name.to_owned(), passed, detail, evidence }
    }
}

/// At most `n` of `items`, for evidence.
fn first<T: Clone>(items: impl IntoIterator<Item = T>, n: usize) -> Vec<T> {
    items.into_iter().take(n).collect()
}

/// Every accepted request id has its terminal row; every row is an accepted request's, the
/// poison's, or possibly one of a key the client gave up on (its answer may have been lost).
pub fn ledger(
    records: &[KeyRecord],
    rows: &HashMap<String, ResultRow>,
    poison: &[Poison],
    resubmits: &[Resubmit],
) -> Check {
    let accepted: BTreeSet<String> = records.iter().filter_map(|r| r.request_id().map(str::to_owned)).collect();
    let missing: Vec<&String> = accepted.iter().filter(|id| !rows.contains_key(*id)).collect();
    let poison_ids: HashSet<&str> = poison.iter().map(|p| p.request_id.as_str()).collect();
    let resubmitted: HashSet<String> =
        resubmits.iter().flat_map(|r| r.answers.iter().filter_map(|a| a.request_id.clone())).collect();
    let gave_up = records.iter().filter(|r| r.gave_up).count();
    let unattributed: Vec<&String> = rows
        .keys()
        .filter(|id| !accepted.contains(*id) && !poison_ids.contains(id.as_str()) && !resubmitted.contains(*id))
        .collect();
    let passed = missing.is_empty() && unattributed.len() <= gave_up;
    Check::new(
        "accepted_equals_terminal_rows",
        passed,
        format!(
            "{} accepted, {} with a terminal row, {} missing; {} other rows ({} poison, {} unattributed, {} keys given up)",
            accepted.len(),
            accepted.len() - missing.len(),
            missing.len(),
            rows.len() - (accepted.len() - missing.len()),
            rows.keys().filter(|id| poison_ids.contains(id.as_str())).count(),
            unattributed.len(),
            gave_up
        ),
        json!({ "missing": first(missing, 20), "unattributed": first(unattributed, 20) }),
    )
}

/// No request id stored twice on an origin (queries, completions, results), for the requests
/// the client had accepted. For results, how many extra copies the sink's key absorbed.
pub fn stored_once(name: &str, what: &str, count: &OriginCount, accepted: &HashSet<String>) -> Check {
    let twice: BTreeMap<String, u32> = count.duplicated().into_iter().filter(|(id, _)| accepted.contains(id)).collect();
    let extra: u32 = twice.values().map(|n| n - 1).sum();
    Check::new(
        name,
        twice.is_empty() && count.complete(),
        format!(
            "{} request ids with a {what} stored more than once ({extra} extra copies){}",
            twice.len(),
            if count.complete() { "" } else { "; the audit did not read everything, so this count is not proof" }
        ),
        json!({ "ids": first(twice, 20), "extra_copies": extra }),
    )
}

/// The audit holds a copy of every message its origins stored.
pub fn audit_complete(counts: &BTreeMap<String, OriginCount>) -> Check {
    let incomplete: Vec<String> = counts
        .iter()
        .filter(|(_, c)| !c.complete())
        .map(|(origin, c)| format!("{origin}: {} stored, {} read, missing {:?}", c.stored, c.read, c.missing_sequences))
        .collect();
    let summary: Vec<String> = counts.iter().map(|(o, c)| format!("{o} {}/{}", c.read, c.stored)).collect();
    Check::new(
        "audit_read_everything_stored",
        incomplete.is_empty(),
        format!("read/stored: {}", summary.join(", ")),
        json!({ "incomplete": incomplete }),
    )
}

/// Every key was answered with one request id only (resubmits included).
pub fn one_id_per_key(records: &[KeyRecord], resubmits: &[Resubmit]) -> Check {
    let mut ids: HashMap<&str, BTreeSet<String>> = HashMap::new();
    for r in records {
        ids.entry(&r.key).or_default().extend(r.request_ids());
    }
    for r in resubmits {
        ids.entry(&r.key).or_default().extend(r.answers.iter().filter_map(|a| a.request_id.clone()));
    }
    let split: Vec<(&str, &BTreeSet<String>)> = ids.iter().filter(|(_, v)| v.len() > 1).map(|(k, v)| (*k, v)).collect();
    Check::new(
        "one_request_id_per_key",
        split.is_empty(),
        format!("{} of {} keys answered with more than one request id", split.len(), ids.len()),
        json!(first(split.into_iter().map(|(k, v)| json!({"key": k, "ids": v})), 20)),
    )
}

/// Keys accepted before the broker restart and submitted again after it were answered 200
/// DUPLICATE with their original id, and no new work was stored for them.
pub fn resubmits_held(resubmits: &[Resubmit], queries: Option<&OriginCount>) -> Check {
    let failed: Vec<Value> = resubmits
        .iter()
        .filter(|r| !r.held())
        .map(|r| {
            let last = r.answers.last();
            json!({
                "key": r.key,
                "original": r.original_request_id,
                "answer": last.map(|a| format!("{} {}", a.http, a.outcome)),
                "answered_id": last.and_then(|a| a.request_id.clone()),
            })
        })
        .collect();
    let requeued: Vec<String> = queries
        .map(|q| {
            resubmits
                .iter()
                .filter(|r| q.per_request.get(&r.original_request_id).copied().unwrap_or(0) > 1)
                .map(|r| r.original_request_id.clone())
                .collect()
        })
        .unwrap_or_default();
    Check::new(
        "resubmits_after_broker_restart_are_duplicates",
        !resubmits.is_empty() && failed.is_empty() && requeued.is_empty(),
        if resubmits.is_empty() {
            "no key was submitted again after a broker restart (the kill-nats fault did not run)".into()
        } else {
            format!(
                "{} of {} resubmitted keys answered 200 DUPLICATE with their id; {} had their query stored again",
                resubmits.len() - failed.len(),
                resubmits.len(),
                requeued.len()
            )
        },
        json!({ "not_duplicate": first(failed, 20), "query_stored_again": first(requeued, 20) }),
    )
}

/// What the session KV holds: conversations and their exchanges' request ids.
pub struct Conversations {
    /// (conversation key, request ids of its exchanges, their assistant texts).
    pub exchanges: Vec<(String, Vec<(String, String)>)>,
    pub unreadable: usize,
}

/// Reads every conversation in the `MR_SESSIONS` bucket.
pub async fn conversations(js: &jetstream::Context) -> anyhow::Result<Conversations> {
    let kv = js.get_key_value("MR_SESSIONS").await?;
    let keys: Vec<String> = kv.keys().await?.try_collect().await?;
    let mut out = Conversations { exchanges: Vec::new(), unreadable: 0 };
    for key in keys {
        let Some(value) = kv.get(&key).await? else { continue };
        match serde_json::from_slice::<Value>(&value) {
            Ok(conversation) => {
                let exchanges = conversation["exchanges"]
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .map(|e| {
                                (
                                    e["request_id"].as_str().unwrap_or_default().to_owned(),
                                    e["assistant"].as_str().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.exchanges.push((key, exchanges));
            }
            Err(_) => out.unreadable += 1,
        }
    }
    Ok(out)
}

/// No request id twice among the exchanges (of one conversation or across them).
pub fn turns_once(conversations: &Conversations) -> Check {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (_, exchanges) in &conversations.exchanges {
        for (id, _) in exchanges {
            *seen.entry(id.as_str()).or_default() += 1;
        }
    }
    let twice: Vec<(&str, usize)> = seen.iter().filter(|(_, n)| **n > 1).map(|(id, n)| (*id, *n)).collect();
    Check::new(
        "no_turn_stored_twice",
        twice.is_empty() && conversations.unreadable == 0,
        format!(
            "{} conversations, {} exchanges, {} request ids stored twice, {} unreadable",
            conversations.exchanges.len(),
            seen.values().sum::<usize>(),
            twice.len(),
            conversations.unreadable
        ),
        json!(first(twice, 20)),
    )
}

/// Every stored exchange belongs to a request the sink stored COMPLETED, with the same answer:
/// the conversation and the store tell the same story.
pub fn conversations_agree(conversations: &Conversations, rows: &HashMap<String, ResultRow>) -> Check {
    let mut disagree = Vec::new();
    let mut n = 0;
    for (id, assistant) in conversations.exchanges.iter().flat_map(|(_, e)| e) {
        n += 1;
        match rows.get(id) {
            Some(row) if row.status == "COMPLETED" && row.completion == *assistant => {}
            Some(row) => disagree
                .push(json!({"request_id": id, "row_status": row.status, "same_text": row.completion == *assistant})),
            None => disagree.push(json!({"request_id": id, "row_status": null})),
        }
    }
    Check::new(
        "conversations_agree_with_store",
        disagree.is_empty(),
        format!("{} of {n} exchanges have no COMPLETED row with the same answer", disagree.len()),
        json!(first(disagree, 20)),
    )
}

/// Every poison message was dead-lettered and nothing else was.
pub fn dead_letters(rows: &[DeadLetter], poison: &[Poison]) -> Check {
    let poison_ids: HashSet<&str> = poison.iter().map(|p| p.request_id.as_str()).collect();
    let stray: Vec<&DeadLetter> = rows.iter().filter(|d| !poison_ids.contains(d.request_id.as_str())).collect();
    let undead: Vec<&Poison> =
        poison.iter().filter(|p| !rows.iter().any(|d| d.request_id == p.request_id && d.stream == p.stream)).collect();
    Check::new(
        "dead_letters_only_for_poison",
        stray.is_empty() && undead.is_empty() && rows.len() == poison.len(),
        format!(
            "{} poison messages injected, {} dead-letter rows: {} of the poison missing, {} rows for anything else",
            poison.len(),
            rows.len(),
            undead.len(),
            stray.len()
        ),
        json!({ "not_dead_lettered": first(undead, 20), "stray": first(stray, 20) }),
    )
}

/// Every service answered `/readyz` 200 at the end.
pub fn all_ready(readiness: &[(String, bool)]) -> Check {
    let unready: Vec<&String> = readiness.iter().filter(|(_, ok)| !ok).map(|(l, _)| l).collect();
    Check::new(
        "every_service_ready_at_the_end",
        unready.is_empty(),
        format!("{} of {} services ready", readiness.len() - unready.len(), readiness.len()),
        json!(unready),
    )
}

/// No `panicked at` in any log (every start of every process).
pub fn no_panics(logs: &[(String, String)]) -> Check {
    let panics: Vec<Value> = logs
        .iter()
        .flat_map(|(label, text)| {
            text.lines().filter(|l| l.contains("panicked at")).map(move |l| json!({"process": label, "line": l}))
        })
        .collect();
    Check::new(
        "no_panic_in_any_log",
        panics.is_empty(),
        format!("{} panics in {} logs", panics.len(), logs.len()),
        json!(first(panics, 20)),
    )
}
