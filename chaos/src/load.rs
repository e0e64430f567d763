//! Open-loop load through ingest's `POST /v1/queries`: requests start at their intended times
//! whatever the mesh does, each with its own `Idempotency-Key`; a failed submit (connection
//! error, timeout, 5xx, 429) is retried with the same key and backoff until it is accepted or
//! the give-up horizon passes. Every answer is recorded per key.
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Arrivals, Plan};
use millrace_proto::now_unix_ms;

/// One answer to one submit attempt.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub at_ms: i64,
    /// HTTP status, or 0 when none came (connection error, timeout).
    pub http: u16,
    /// `ACCEPTED`, `DUPLICATE`, an error code, or what went wrong.
    pub outcome: String,
    pub request_id: Option<String>,
}

impl Answer {
    pub fn accepted(&self) -> bool {
        self.http == 200 || self.http == 202
    }
}

/// Everything the client did for one logical request.
#[derive(Debug, Clone, Serialize)]
pub struct KeyRecord {
    pub key: String,
    pub user: String,
    pub session: String,
    pub text: String,
    pub intended_ms: i64,
    pub accepted_ms: Option<i64>,
    pub answers: Vec<Answer>,
    pub gave_up: bool,
}

impl KeyRecord {
    /// The request id of the first accepting answer.
    pub fn request_id(&self) -> Option<&str> {
        self.answers.iter().find(|a| a.accepted()).and_then(|a| a.request_id.as_deref())
    }

    /// Every request id this key was answered with.
    pub fn request_ids(&self) -> BTreeSet<String> {
        self.answers.iter().filter_map(|a| a.request_id.clone()).collect()
    }

    /// Attempts beyond the first.
    pub fn retries(&self) -> usize {
        self.answers.len().saturating_sub(1)
    }
}

/// A key submitted again after the broker restart, and what it was answered.
#[derive(Debug, Clone, Serialize)]
pub struct Resubmit {
    pub key: String,
    pub original_request_id: String,
    pub answers: Vec<Answer>,
}

impl Resubmit {
    /// 200 DUPLICATE with the original id.
    pub fn held(&self) -> bool {
        self.answers.iter().find(|a| a.accepted()).is_some_and(|a| {
            a.http == 200 && a.outcome == "DUPLICATE" && a.request_id.as_deref() == Some(&self.original_request_id)
        })
    }
}

/// What the client shares between its tasks.
pub struct Shared {
    pub records: Mutex<Vec<KeyRecord>>,
    pub resubmits: Mutex<Vec<Resubmit>>,
    ingest: RwLock<String>,
    http: reqwest::Client,
    plan: Plan,
}

/// The running load.
pub struct Load {
    pub shared: Arc<Shared>,
    stop: CancellationToken,
    generator: tokio::task::JoinHandle<JoinSet<()>>,
}

/// Words the texts are made of: plain, so input moderation lets them through.
const WORDS: [&str; 24] = [
    "river", "stone", "mill", "water", "wheel", "grain", "flour", "morning", "bread", "valley", "bridge", "lantern",
    "garden", "orchard", "meadow", "harbour", "window", "letter", "story", "music", "autumn", "summer", "candle",
    "path",
];

impl Load {
    /// Starts offering `plan.rate` requests per second to ingest at `ingest` (`host:port`).
    pub fn start(plan: &Plan, ingest: String) -> Load {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .expect("an HTTP client");
        let shared = Arc::new(Shared {
            records: Mutex::new(Vec::new()),
            resubmits: Mutex::new(Vec::new()),
            ingest: RwLock::new(ingest),
            http,
            plan: plan.clone(),
        });
        let stop = CancellationToken::new();
        let generator = tokio::spawn(generate(shared.clone(), stop.clone()));
        Load { shared, stop, generator }
    }

    /// Points the client at ingest's new address (after a restart on fresh ports).
    pub fn retarget(&self, ingest: String) {
        *self.shared.ingest.write().expect("ingest lock") = ingest;
    }

    /// Stops starting requests and waits for the ones under way (each ends by the give-up horizon).
    pub async fn stop(self) -> Arc<Shared> {
        self.stop.cancel();
        let mut tasks = self.generator.await.unwrap_or_default();
        while tasks.join_next().await.is_some() {}
        self.shared
    }

    /// A copy of the records so far.
    pub fn records(&self) -> Vec<KeyRecord> {
        self.shared.records.lock().expect("records lock").clone()
    }

    /// `n` requests of one user at once, past the session's per-user rate limit, so some end
    /// RATE_LIMITED (a legitimate terminal status, and the one the broker-restart defect re-ran);
    /// returns once each is answered.
    pub async fn burst(&self, n: usize) {
        let at = now_unix_ms();
        let mut tasks = JoinSet::new();
        for i in 0..n {
            let record = KeyRecord {
                key: uuid::Uuid::new_v4().to_string(),
                user: "chaos-burst".into(),
                session: "burst".into(),
                text: format!("Tell me about the mill in a hurry (burst #{i})."),
                intended_ms: at,
                accepted_ms: None,
                answers: Vec::new(),
                gave_up: false,
            };
            tasks.spawn(submit_recorded(self.shared.clone(), record));
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Submits `keys` again (same key, same body), each until accepted or the horizon passes.
    pub async fn resubmit(&self, keys: Vec<KeyRecord>) -> Vec<Resubmit> {
        let mut tasks = JoinSet::new();
        for record in keys {
            let shared = self.shared.clone();
            tasks.spawn(async move {
                let original_request_id = record.request_id().unwrap_or_default().to_owned();
                let answers = submit_until_accepted(&shared, &record).await;
                Resubmit { key: record.key, original_request_id, answers }
            });
        }
        let mut done = Vec::new();
        while let Some(resubmit) = tasks.join_next().await {
            if let Ok(resubmit) = resubmit {
                done.push(resubmit);
            }
        }
        self.shared.resubmits.lock().expect("resubmits lock").extend(done.clone());
        done
    }
}

/// Starts requests at their intended times until stopped; returns the tasks under way.
async fn generate(shared: Arc<Shared>, stop: CancellationToken) -> JoinSet<()> {
    let plan = shared.plan.clone();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut tasks = JoinSet::new();
    let mean_gap = 1.0 / plan.rate.max(0.001);
    let (start, start_ms) = (tokio::time::Instant::now(), now_unix_ms());
    let mut next = start;
    let mut n: usize = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => return tasks,
        }
        let late = next.elapsed();
        if late > Duration::from_millis(200) {
            eprintln!("[chaos] load generator {late:?} late");
        }
        let user = rng.random_range(0..plan.users.max(1));
        let words: Vec<&str> = (0..rng.random_range(3..8)).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
        let record = KeyRecord {
            key: uuid::Uuid::from_u128(rng.random()).to_string(),
            user: format!("chaos-user-{user}"),
            // A few conversations per user keep each one short.
            session: format!("s{}", rng.random_range(0..4)),
            text: format!("Tell me about the {} (#{n}).", words.join(" ")),
            // The scheduled time, whether or not the generator woke on time.
            intended_ms: start_ms + (next - start).as_millis() as i64,
            accepted_ms: None,
            answers: Vec::new(),
            gave_up: false,
        };
        n += 1;
        tasks.spawn(submit_recorded(shared.clone(), record));
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
        let gap = match plan.arrivals {
            Arrivals::Constant => mean_gap,
            Arrivals::Poisson => -mean_gap * (1.0 - rng.random::<f64>()).ln(),
        };
        next += Duration::from_secs_f64(gap);
    }
}

/// Records `record`, submits it until accepted or given up, and records the answers.
async fn submit_recorded(shared: Arc<Shared>, record: KeyRecord) {
    let index = {
        let mut records = shared.records.lock().expect("records lock");
        records.push(record.clone());
        records.len() - 1
    };
    let answers = submit_until_accepted(&shared, &record).await;
    let mut records = shared.records.lock().expect("records lock");
    let stored = &mut records[index];
    stored.accepted_ms = answers.iter().find(|a| a.accepted()).map(|a| a.at_ms);
    stored.gave_up = stored.accepted_ms.is_none();
    stored.answers = answers;
}

/// Submits `record` until an answer accepts it (202 or 200) or the give-up horizon passes;
/// every answer, in order.
async fn submit_until_accepted(shared: &Shared, record: &KeyRecord) -> Vec<Answer> {
    let plan = &shared.plan;
    let horizon = tokio::time::Instant::now() + Duration::from_secs_f64(plan.give_up_s);
    let body = json!({
        "user": record.user,
        "session": record.session,
        "text": record.text,
        "model": plan.model,
        "deadline_ms": plan.deadline_ms,
        "params": {"max_new_tokens": plan.max_new_tokens, "ignore_eos": true},
    });
    let mut answers = Vec::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let url = format!("http://{}/v1/queries", shared.ingest.read().expect("ingest lock"));
        let sent = shared.http.post(&url).header("Idempotency-Key", &record.key).json(&body).send().await;
        let answer = match sent {
            Ok(response) => {
                let http = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                let outcome = value["status"]
                    .as_str()
                    .or_else(|| value["error"]["code"].as_str())
                    .map_or_else(|| format!("http {http}"), str::to_owned);
                let request_id = value["request_id"].as_str().map(str::to_owned);
                Answer { at_ms: now_unix_ms(), http, outcome, request_id }
            }
            Err(e) => Answer {
                at_ms: now_unix_ms(),
                http: 0,
                outcome: if e.is_timeout() {
                    "timeout".into()
                } else if e.is_connect() {
                    "connect".into()
                } else {
                    "transport".into()
                },
                request_id: None,
            },
        };
        let retry = answer.http == 0 || answer.http == 429 || answer.http >= 500;
        let done = answer.accepted() || !retry;
        answers.push(answer);
        if done || tokio::time::Instant::now() + backoff > horizon {
            return answers;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
