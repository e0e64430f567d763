//! The preprocess service as deployed: the `preprocess` binary against a real nats-server,
//! fed Queries on QUERIES as ingest publishes them, read back from CLEAN (the moderation input
//! consumer) and RESULTS. Needs `models/prepared/manifest.json` (`scripts/prepare-models.sh`).
use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use millrace_bus::publisher::Outbound;
use millrace_bus::topology::{ConsumerSpec, Edge};
use millrace_bus::{Dedup, Publisher};
use millrace_proto::v1::{
    ChatTurn, CleanedQuery, Query, RequestContext, Result as TerminalResult, TerminalStatus, Timings,
};
use millrace_proto::{Message as _, now_unix_ms, now_unix_us};
use millrace_testkit::bus::{publisher, stream, stream_len, wait_result};
use millrace_testkit::{NatsServer, ServiceProcess, models_dir};

const MODEL: &str = "smollm2-135m";

struct Mesh {
    publisher: Publisher,
    process: ServiceProcess,
    // Last: the service goes before its server.
    _nats: NatsServer,
}

impl Mesh {
    async fn start(extra: &[&str]) -> Mesh {
        let nats = NatsServer::start().await.unwrap();
        let mut args = vec![format!("--nats-url={}", nats.url()), format!("--models-dir={}", models_dir().display())];
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = ServiceProcess::start("preprocess", &args, &[], Duration::from_secs(60)).await.unwrap();
        let publisher = publisher(&nats).await;
        Mesh { publisher, process, _nats: nats }
    }

    /// Publishes a Query as ingest does (dedup id `<rid>/ingest`, ingest's timing recorded).
    async fn submit(&self, request_id: &str, model: &str, text: &str) {
        self.submit_conversation(request_id, model, &[], text).await;
    }

    /// Publishes a Query whose client sent `messages` before `text` (OpenAI's API).
    async fn submit_conversation(&self, request_id: &str, model: &str, messages: &[(&str, &str)], text: &str) {
        let mut timings = Timings::default();
        timings.record("ingest", now_unix_us());
        let query = Query {
            ctx: Some(RequestContext {
                request_id: request_id.to_owned(),
                tenant: "default".into(),
                model: model.to_owned(),
                accepted_unix_ms: now_unix_ms(),
                ..Default::default()
            }),
            timings: Some(timings),
            text: text.to_owned(),
            messages: messages
                .iter()
                .map(|(role, content)| ChatTurn { role: (*role).into(), content: (*content).into() })
                .collect(),
        };
        self.publisher
            .publish(Outbound {
                subject: Edge::QUERIES.subject_for(""),
                msg_id: Dedup::Stage("ingest").msg_id(request_id),
                payload: query.encode_to_vec().into(),
            })
            .await
            .unwrap();
    }

    /// The next `n` CleanedQueries on CLEAN (acked, as moderation would), by request id, with
    /// their `Nats-Msg-Id`.
    async fn cleaned(&self, n: usize) -> HashMap<String, (String, CleanedQuery)> {
        let stream = stream(self.publisher.jetstream(), Edge::CLEAN).await;
        let consumer: PullConsumer = stream.get_consumer(ConsumerSpec::MODERATION_INPUT.durable).await.unwrap();
        let mut found = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while found.len() < n {
            assert!(Instant::now() < deadline, "{} of {n} cleaned queries; log:\n{}", found.len(), self.process.logs());
            let mut batch = consumer
                .fetch()
                .max_messages(n - found.len())
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .unwrap();
            while let Some(m) = batch.next().await {
                let m = m.unwrap();
                let id =
                    m.headers.as_ref().unwrap().get(async_nats::header::NATS_MESSAGE_ID).unwrap().as_str().to_owned();
                let q = CleanedQuery::decode(m.payload.clone()).unwrap();
                m.ack().await.unwrap();
                assert!(
                    found.insert(q.ctx.clone().unwrap().request_id, (id, q)).is_none(),
                    "two cleaned queries for one request"
                );
            }
        }
        found
    }

    /// The terminal result of `request_id`, waiting for it.
    async fn result(&self, request_id: &str) -> (String, TerminalResult) {
        wait_result(self.publisher.jetstream(), request_id, Duration::from_secs(30)).await
    }

    async fn rejected(&self, request_id: &str, reason: &str) -> TerminalResult {
        let (id, r) = self.result(request_id).await;
        assert_eq!(id, format!("{request_id}/outcome"));
        assert_eq!(r.status(), TerminalStatus::Rejected, "{r:?}");
        assert_eq!((r.reason.as_str(), r.stage.as_str()), (reason, "preprocess"), "{r:?}");
        assert!(!r.detail.is_empty());
        assert_eq!(r.ctx.as_ref().unwrap().request_id, request_id);
        let stages = stage_names(r.timings.as_ref());
        assert_eq!(stages, ["ingest", "preprocess"]);
        r
    }

    async fn stream_messages(&self, edge: Edge) -> u64 {
        stream_len(self.publisher.jetstream(), edge).await
    }
}

/// The messages a client sent before its new turn reach the model too: they are normalized
/// and redacted like the text, their placeholders counted with the text's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn earlier_messages_are_normalized_and_redacted_like_the_text() {
    let mesh = Mesh::start(&[]).await;
    let earlier =
        [("system", "Answer  as\u{202E} a clerk."), ("user", "Mail me at bob@example.com"), ("assistant", "Sure.")];
    mesh.submit_conversation("r-conv", MODEL, &earlier, "Call +44 20 7946 0958 instead").await;
    let cleaned = mesh.cleaned(1).await;
    let (_, q) = &cleaned["r-conv"];
    assert_eq!(q.text, "Call [PHONE_1] instead");
    let turns: Vec<(&str, &str)> = q.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
    assert_eq!(turns, [("system", "Answer as a clerk."), ("user", "Mail me at [EMAIL_1]"), ("assistant", "Sure.")]);
    assert_eq!(q.redactions, HashMap::from([("email".into(), 1), ("phone".into(), 1)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacts_and_counts_rejects_bad_input_and_keeps_going() {
    let mesh = Mesh::start(&[]).await;
    let pii = "Hi,\u{200B} I'm Ann: ann@example.com,   card 4111 1111 1111 1111, call +44 20 7946 0958.\n\n\n\
               Again: ANN@example.com. Order #12345678 of 2024-05-01.";
    mesh.submit("r-pii", MODEL, pii).await;
    mesh.submit("r-empty", MODEL, "\u{200B}\u{200D}\u{FEFF}\u{2060}").await;
    mesh.submit("r-long", MODEL, &"a".repeat(8001)).await;
    mesh.submit("r-model", "gpt-9", "What is the capital of France?").await;

    let cleaned = mesh.cleaned(1).await;
    let (id, q) = &cleaned["r-pii"];
    assert_eq!(id, "r-pii/preprocess");
    assert_eq!(
        q.text,
        "Hi, I'm Ann: [EMAIL_1], card [CARD_1], call [PHONE_1].\n\nAgain: [EMAIL_1]. Order #12345678 of 2024-05-01."
    );
    assert_eq!(q.redactions, HashMap::from([("email".into(), 2), ("card".into(), 1), ("phone".into(), 1)]));
    assert!((20..60).contains(&q.token_count), "{}", q.token_count);
    assert!(!q.truncated);
    let ctx = q.ctx.as_ref().unwrap();
    assert_eq!((ctx.model.as_str(), ctx.tenant.as_str()), (MODEL, "default"));
    let stages = stage_names(q.timings.as_ref());
    assert_eq!(stages, ["ingest", "preprocess"]);

    mesh.rejected("r-empty", "empty_text").await;
    let r = mesh.rejected("r-long", "text_too_long").await;
    assert!(r.detail.contains("8001"), "{}", r.detail);
    let r = mesh.rejected("r-model", "unknown_model").await;
    assert!(r.detail.contains("gpt-9"), "{}", r.detail);
    // A rejection carries no text, original or cleaned.
    assert!(r.prompt.is_empty());

    // Still running: a good query after the bad ones passes.
    mesh.submit("r-good", MODEL, "What is the capital of France?").await;
    let cleaned = mesh.cleaned(1).await;
    let (_, q) = &cleaned["r-good"];
    assert_eq!(q.text, "What is the capital of France?");
    assert!(q.redactions.is_empty());
    assert_eq!(q.token_count, 7);

    // Expected rejections are ordinary outcomes: nothing was dead-lettered, and the cleaned
    // queries are not also results.
    assert_eq!(mesh.stream_messages(Edge::DLQ).await, 0);
    assert_eq!(mesh.stream_messages(Edge::RESULTS).await, 3);
}

const LONG: &str = "The quick brown fox jumps over the lazy dog; write to ann@example.com about it. ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_tokens_is_rejected_by_default() {
    // Budget 8192 − 8092 = 100 tokens.
    let mesh = Mesh::start(&["--reserve-tokens=8092"]).await;
    mesh.submit("r-tokens", MODEL, &LONG.repeat(20)).await;
    let r = mesh.rejected("r-tokens", "too_many_tokens").await;
    assert!(r.detail.contains("budget is 100"), "{}", r.detail);
    mesh.submit("r-fits", MODEL, LONG).await;
    let cleaned = mesh.cleaned(1).await;
    assert!(!cleaned["r-fits"].1.truncated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_tokens_is_truncated_by_policy() {
    let mesh = Mesh::start(&["--reserve-tokens=8092", "--overflow=truncate"]).await;
    mesh.submit("r-tokens", MODEL, &LONG.repeat(20)).await;
    let cleaned = mesh.cleaned(1).await;
    let (_, q) = &cleaned["r-tokens"];
    assert!(q.truncated);
    assert!((90..=100).contains(&q.token_count), "{}", q.token_count);
    assert!(q.text.starts_with("The quick brown fox jumps over the lazy dog; write to [EMAIL_1] about it."));
    assert!(q.text.len() < LONG.len() * 20);
    assert!(q.redactions["email"] >= 1);
}

/// The stages a message's timings name, in order.
fn stage_names(timings: Option<&Timings>) -> Vec<&str> {
    timings.expect("timings").stages.iter().map(|s| s.stage.as_str()).collect()
}
