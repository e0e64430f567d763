//! The session service against a real nats-server, run as the deployed binary. The test plays
//! moderation (it publishes ADMITTED queries and terminal RESULTS) and the batcher (it pulls
//! PROMPTS with the `batcher` durable), and calls the gRPC `Sessions` API.
//!
//! No assertion depends on timing: every wait polls for a state until a generous deadline.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use millrace_bus::publisher::Outbound;
use millrace_bus::topology::Edge;
use millrace_bus::{Dedup, Publisher};
use millrace_proto::Message as _;
use millrace_proto::v1::sessions_client::SessionsClient;
use millrace_proto::v1::{
    AdmittedQuery, ChatTurn, Prompt, RequestContext, Result as TerminalResult, SessionKey, SessionState,
    TerminalStatus, Timings,
};
use millrace_session::key::SessionId;
use millrace_session::prompt::PromptModels;
use millrace_session::state::Conversation;
use millrace_testkit::bus::{publisher, result, stream, stream_len};
use millrace_testkit::{NatsServer, ServiceProcess, models_dir};
use tonic::Code;

const MODEL: &str = "smollm2-135m";
const TENANT: &str = "t0";
const WAIT: Duration = Duration::from_secs(20);
const SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

struct Session {
    process: ServiceProcess,
}

impl Session {
    async fn start(nats: &NatsServer, extra: &[&str]) -> Session {
        let mut args = vec![format!("--nats-url={}", nats.url()), format!("--models-dir={}", models_dir().display())];
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = ServiceProcess::start("session", &args, &["--grpc-addr"], WAIT).await.unwrap();
        Session { process }
    }

    async fn client(&self) -> SessionsClient<tonic::transport::Channel> {
        SessionsClient::connect(format!("http://{}", self.process.addr("--grpc-addr"))).await.unwrap()
    }

    async fn get(&self, user: &str, session: &str) -> Result<SessionState, tonic::Status> {
        self.client().await.get(key(user, session)).await.map(|r| r.into_inner())
    }

    /// Polls `Get` until the conversation holds `turns` turns (user + assistant each count).
    async fn wait_turns(&self, user: &str, session: &str, turns: usize) -> SessionState {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(state) = self.get(user, session).await
                && state.turns.len() == turns
            {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "{user}/{session} never reached {turns} turns; log:\n{}",
                self.process.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metrics(&self) -> String {
        self.process.metrics().await.unwrap()
    }
}

/// An unlabelled counter's value (absent: 0).
fn metric(text: &str, name: &str) -> f64 {
    millrace_testkit::metrics::metric(text, name, &[]).unwrap_or(0.0)
}

fn key(user: &str, session: &str) -> SessionKey {
    SessionKey { tenant: TENANT.into(), user: user.into(), session: session.into() }
}

fn ctx(request_id: &str, user: &str, session: &str) -> RequestContext {
    RequestContext {
        request_id: request_id.into(),
        tenant: TENANT.into(),
        user: user.into(),
        session: session.into(),
        model: MODEL.into(),
        ..Default::default()
    }
}

/// The test's side of the bus: a publisher, and the batcher's durable on PROMPTS.
struct Bus {
    publisher: Publisher,
    prompts: PullConsumer,
    /// Prompts pulled while looking for another one.
    seen: HashMap<String, Prompt>,
}

impl Bus {
    async fn connect(nats: &NatsServer) -> Bus {
        let publisher = publisher(nats).await;
        let prompts = stream(publisher.jetstream(), Edge::PROMPTS).await.get_consumer("batcher").await.unwrap();
        Bus { publisher, prompts, seen: HashMap::new() }
    }

    fn admitted_message(request_id: &str, user: &str, session: &str, text: &str) -> Outbound {
        let query = AdmittedQuery {
            ctx: Some(ctx(request_id, user, session)),
            timings: Some(Timings::default()),
            text: text.into(),
            token_count: 0,
            verdicts: vec![],
            messages: vec![],
        };
        Outbound {
            subject: Edge::ADMITTED.subject_for(""),
            msg_id: Dedup::Stage("moderation").msg_id(request_id),
            payload: query.encode_to_vec().into(),
        }
    }

    /// Admits a stateless query (OpenAI's API without a session id) with its own earlier messages.
    async fn ask_stateless(&mut self, request_id: &str, user: &str, messages: &[(&str, &str)], text: &str) -> Prompt {
        let query = AdmittedQuery {
            ctx: Some(RequestContext { stateless: true, ..ctx(request_id, user, "") }),
            timings: Some(Timings::default()),
            text: text.into(),
            messages: messages
                .iter()
                .map(|(role, content)| ChatTurn { role: (*role).into(), content: (*content).into() })
                .collect(),
            ..Default::default()
        };
        self.publisher.publish(Outbound::stage_output(Edge::ADMITTED, "moderation", &query)).await.unwrap();
        self.prompt(request_id).await
    }

    async fn admit(&self, request_id: &str, user: &str, session: &str, text: &str) {
        self.publisher.publish(Self::admitted_message(request_id, user, session, text)).await.unwrap();
    }

    /// A terminal result as moderation(output) or another stage would publish it; `copy` makes
    /// a distinct message id, as a redelivery or a second publisher would.
    fn result_message(
        request_id: &str,
        user: &str,
        session: &str,
        status: TerminalStatus,
        completion: &str,
        copy: u32,
    ) -> Outbound {
        let result = TerminalResult {
            ctx: Some(ctx(request_id, user, session)),
            status: status.into(),
            prompt: "(rendered prompt)".into(),
            completion: completion.into(),
            stage: "moderation".into(),
            ..Default::default()
        };
        Outbound {
            subject: Edge::RESULTS.subject_for(request_id),
            msg_id: Dedup::Stage(&format!("moderation-{copy}")).msg_id(request_id),
            payload: result.encode_to_vec().into(),
        }
    }

    async fn complete(&self, request_id: &str, user: &str, session: &str, completion: &str) {
        let out = Self::result_message(request_id, user, session, TerminalStatus::Completed, completion, 0);
        self.publisher.publish(out).await.unwrap();
    }

    /// The prompt of `request_id` (pulled and acked as the batcher would).
    async fn prompt(&mut self, request_id: &str) -> Prompt {
        let deadline = Instant::now() + WAIT;
        while !self.seen.contains_key(request_id) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no prompt for {request_id} within {WAIT:?}");
            let mut batch = self
                .prompts
                .batch()
                .max_messages(1)
                .expires(left.min(Duration::from_secs(1)))
                .messages()
                .await
                .unwrap();
            while let Some(message) = batch.next().await {
                let message = message.unwrap();
                assert_eq!(message.subject.as_str(), Edge::PROMPTS.subject_for(MODEL));
                let prompt = Prompt::decode(message.payload.clone()).unwrap();
                message.ack().await.unwrap();
                let id = prompt.ctx.as_ref().unwrap().request_id.clone();
                assert!(self.seen.insert(id.clone(), prompt).is_none(), "two prompts for {id}");
            }
        }
        self.seen[request_id].clone()
    }

    /// Admits a query and returns its prompt.
    async fn ask(&mut self, request_id: &str, user: &str, session: &str, text: &str) -> Prompt {
        self.admit(request_id, user, session, text).await;
        self.prompt(request_id).await
    }

    /// The terminal result RESULTS holds for `request_id`, if any (without waiting).
    async fn result(&self, request_id: &str) -> Option<TerminalResult> {
        result(self.publisher.jetstream(), request_id).await.map(|(_, result)| result)
    }

    /// The stored conversation, read straight from the bucket.
    async fn stored(&self, user: &str, session: &str) -> Option<Conversation> {
        let kv = self.publisher.jetstream().get_key_value("MR_SESSIONS").await.unwrap();
        let value = kv.get(SessionId::new(TENANT, user, session).key()).await.unwrap()?;
        Some(Conversation::from_json(&value).unwrap())
    }
}

/// The prompt's user and assistant contents, in order, without the template's markers.
fn contents(prompt: &str) -> Vec<(String, String)> {
    prompt
        .split("<|im_start|>")
        .filter_map(|part| {
            let (role, rest) = part.split_once('\n')?;
            Some((role.to_owned(), rest.strip_suffix("<|im_end|>\n")?.to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn later_turns_see_earlier_context_and_forget_me_starts_afresh() {
    let nats = NatsServer::start().await.unwrap();
    let session = Session::start(&nats, &[]).await;
    let mut bus = Bus::connect(&nats).await;
    let (user, sid) = ("alice", "chat-1");

    let first = bus.ask("r1", user, sid, "What is the capital of France?").await;
    assert_eq!(first.turns_used, 0);
    assert_eq!(first.user_text, "What is the capital of France?");
    assert_eq!(
        first.prompt,
        format!(
            "<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        )
    );
    assert!(first.prompt_tokens > 10);
    let timing = first.timings.as_ref().unwrap().stages.last().unwrap();
    assert_eq!(timing.stage, "session");
    assert!(timing.finished_unix_us >= timing.received_unix_us);
    // Pending only: nothing remembered yet.
    assert!(session.get(user, sid).await.unwrap().turns.is_empty());

    bus.complete("r1", user, sid, "The capital of France is Paris.").await;
    session.wait_turns(user, sid, 2).await;

    let second = bus.ask("r2", user, sid, "And of Italy?").await;
    assert_eq!(second.turns_used, 1);
    assert_eq!(
        contents(&second.prompt),
        [
            ("system", SYSTEM),
            ("user", "What is the capital of France?"),
            ("assistant", "The capital of France is Paris."),
            ("user", "And of Italy?"),
        ]
        .map(|(r, c)| (r.to_owned(), c.to_owned()))
    );
    assert!(second.prompt.ends_with("<|im_start|>assistant\n"));
    assert!(second.prompt_tokens > first.prompt_tokens);

    // A turn that does not complete is never remembered; a redelivered result adds nothing.
    bus.publisher.publish(Bus::result_message("r2", user, sid, TerminalStatus::BlockedOutput, "", 0)).await.unwrap();
    bus.publisher
        .publish(Bus::result_message("r1", user, sid, TerminalStatus::Completed, "The capital of France is Paris.", 1))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !bus.stored(user, sid).await.unwrap().pending.is_empty() {
        assert!(Instant::now() < deadline, "the blocked turn stayed pending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let state = session.wait_turns(user, sid, 2).await;
    let roles: Vec<&str> = state.turns.iter().map(|t| t.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant"]);
    assert!(state.turns.iter().all(|t| t.request_id == "r1"));
    assert_eq!(state.bytes as usize, "What is the capital of France?".len() + "The capital of France is Paris.".len());
    assert!(state.tokens > 5 && state.tokens < 40, "{}", state.tokens);
    assert!(state.revision > 0);
    assert_eq!(state.expires_unix_ms - state.updated_unix_ms, 1800 * 1000);
    assert_eq!(state.key.unwrap(), key(user, sid));
    let third = bus.ask("r3", user, sid, "Thanks").await;
    assert_eq!(third.turns_used, 1, "the blocked turn is not history");
    assert!(!third.prompt.contains("And of Italy?"));

    // Bad keys.
    let e = session.client().await.get(key("", sid)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = session.get("nobody", sid).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.metadata().get("x-millrace-code").unwrap(), "session_not_found");

    // Forget me: gone, and the next query starts fresh.
    let mut client = session.client().await;
    assert!(client.delete(key(user, sid)).await.unwrap().into_inner().existed);
    assert_eq!(session.get(user, sid).await.unwrap_err().code(), Code::NotFound);
    assert!(!client.delete(key(user, sid)).await.unwrap().into_inner().existed);
    // r3's answer arrives after the delete: nothing of the old conversation comes back.
    bus.complete("r3", user, sid, "You're welcome.").await;
    let fresh = bus.ask("r4", user, sid, "Who am I?").await;
    assert_eq!(fresh.turns_used, 0);
    assert!(!fresh.prompt.contains("France") && !fresh.prompt.contains("welcome"));
    assert!(session.get(user, sid).await.unwrap().turns.is_empty());
}

/// OpenAI's API is stateless: the request's messages are the conversation, its system message
/// replaces the default one, and nothing is read from or written to any stored conversation,
/// so two anonymous clients never see each other's text.
#[tokio::test]
async fn stateless_queries_are_their_own_messages_and_leave_nothing_behind() {
    let nats = NatsServer::start().await.unwrap();
    let session = Session::start(&nats, &[]).await;
    let mut bus = Bus::connect(&nats).await;
    let user = "anonymous";
    // Someone's stored conversation under the same user name must not leak in either.
    bus.ask("kept-1", user, "default", "My secret is 4711.").await;
    bus.complete("kept-1", user, "default", "Noted.").await;
    session.wait_turns(user, "default", 2).await;

    let earlier = [("system", "You are a pirate."), ("user", "Hi"), ("assistant", "Arr!")];
    let first = bus.ask_stateless("s1", user, &earlier, "Where is the treasure?").await;
    assert_eq!(
        contents(&first.prompt),
        [("system", "You are a pirate."), ("user", "Hi"), ("assistant", "Arr!"), ("user", "Where is the treasure?")]
            .map(|(r, c)| (r.to_owned(), c.to_owned()))
    );
    assert_eq!(first.turns_used, 2);
    bus.complete("s1", user, "", "Under the palm tree.").await;

    let second = bus.ask_stateless("s2", user, &[], "What did I tell you?").await;
    assert_eq!(
        contents(&second.prompt),
        [("system", SYSTEM), ("user", "What did I tell you?")].map(|(r, c)| (r.to_owned(), c.to_owned()))
    );
    assert!(second.prompt_tokens < first.prompt_tokens);
    // Nothing stored for the stateless requests: the kept conversation is as it was, and no
    // conversation exists under an empty session.
    assert!(bus.stored(user, "").await.is_none());
    let kept = session.get(user, "default").await.unwrap();
    assert!(kept.turns.iter().all(|t| t.request_id == "kept-1"), "{:?}", kept.turns);
}

#[tokio::test]
async fn an_idle_conversation_expires() {
    let nats = NatsServer::start().await.unwrap();
    let session = Session::start(&nats, &["--idle-ttl-s=2"]).await;
    let mut bus = Bus::connect(&nats).await;
    let (user, sid) = ("dora", "s");
    bus.ask("e1", user, sid, "Remember the number 42.").await;
    bus.complete("e1", user, sid, "I will remember 42.").await;
    let state = session.wait_turns(user, sid, 2).await;
    assert_eq!(state.expires_unix_ms - state.updated_unix_ms, 2000);
    // Untouched, it disappears (the server expires it; poll rather than assume when).
    let deadline = Instant::now() + WAIT;
    while session.get(user, sid).await.is_ok() {
        assert!(Instant::now() < deadline, "the conversation never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let next = bus.ask("e2", user, sid, "What was the number?").await;
    assert_eq!(next.turns_used, 0);
    assert!(!next.prompt.contains("42"));
}

#[tokio::test]
async fn history_is_trimmed_oldest_first_to_the_token_budget() {
    let nats = NatsServer::start().await.unwrap();
    let models = PromptModels::load(&models_dir()).unwrap();
    let model = models.get(MODEL).unwrap();
    let budget = 220;
    let reserve = model.context_length() - budget;
    let session = Session::start(&nats, &[&format!("--reserve-tokens={reserve}"), "--max-turns=50"]).await;
    let mut bus = Bus::connect(&nats).await;
    let (user, sid) = ("erin", "long");
    let long = |who: &str, k: usize| format!("{who} {k}: {}", "the quick brown fox jumps over the lazy dog ".repeat(3));
    for k in 0..6 {
        let p = bus.ask(&format!("t{k}"), user, sid, &long("Question", k)).await;
        assert!(p.prompt_tokens as usize <= budget);
        bus.complete(&format!("t{k}"), user, sid, &long("Answer", k)).await;
        session.wait_turns(user, sid, 2 * (k + 1)).await;
    }
    let p = bus.ask("t6", user, sid, "Summarize.").await;
    assert_eq!(p.prompt_tokens as usize, model.count(&p.prompt).unwrap(), "counted with the model's tokenizer");
    assert!(p.prompt_tokens as usize <= budget, "{} tokens over the budget {budget}", p.prompt_tokens);
    let used = p.turns_used as usize;
    assert!((1..6).contains(&used), "turns_used {used}: the budget holds some but not all six exchanges");
    assert_eq!(p.turns_dropped as usize, 6 - used, "the prompt says how much was trimmed");
    // Exactly the newest `used` exchanges, whole and in order.
    let expected: Vec<(String, String)> = [("system".to_owned(), SYSTEM.to_owned())]
        .into_iter()
        .chain(
            (6 - used..6)
                .flat_map(|k| [("user".to_owned(), long("Question", k)), ("assistant".to_owned(), long("Answer", k))]),
        )
        .chain([("user".to_owned(), "Summarize.".to_owned())])
        .collect();
    assert_eq!(contents(&p.prompt), expected);
    // The state still holds all six: trimming is per prompt, `--max-turns` bounds storage.
    assert_eq!(session.get(user, sid).await.unwrap().turns.len(), 12);
    assert!(metric(&session.metrics().await, "millrace_session_turns_trimmed_total") >= (6 - used) as f64);
}

#[tokio::test]
async fn a_burst_over_the_user_limit_is_rate_limited() {
    let nats = NatsServer::start().await.unwrap();
    // 3 at once, then one per 1000 s: nothing refills during the test.
    let session = Session::start(&nats, &["--burst=3", "--rate-per-s=0.001"]).await;
    let mut bus = Bus::connect(&nats).await;
    let ids: Vec<String> = (0..8).map(|i| format!("b{i}")).collect();
    bus.publisher.publish_all(ids.iter().map(|id| Bus::admitted_message(id, "bob", "s", "hello"))).await.unwrap();
    // Another user has a bucket of their own.
    let carol = bus.ask("c0", "carol", "s", "hi").await;
    assert_eq!(carol.turns_used, 0);

    let deadline = Instant::now() + WAIT;
    let mut limited = BTreeMap::new();
    while limited.len() < 5 {
        for id in &ids {
            if let Some(r) = bus.result(id).await {
                limited.insert(id.clone(), r);
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {} rate-limited results; log:\n{}",
            limited.len(),
            session.process.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in limited.values() {
        assert_eq!(r.status, i32::from(TerminalStatus::RateLimited));
        assert_eq!((r.reason.as_str(), r.stage.as_str()), ("rate_limited", "session"));
        assert!(r.retry_after_ms > 0);
        assert_eq!(r.ctx.as_ref().unwrap().user, "bob");
    }
    let passed: Vec<&String> = ids.iter().filter(|id| !limited.contains_key(*id)).collect();
    assert_eq!(passed.len(), 3);
    for id in passed {
        assert_eq!(bus.prompt(id).await.user_text, "hello");
    }
    for id in limited.keys() {
        assert!(!bus.seen.contains_key(id), "{id} was both limited and prompted");
    }
    // Nothing else is coming: every query got exactly one outcome.
    let mut prompts = bus.prompts.clone();
    assert_eq!(prompts.info().await.unwrap().num_pending, 0);
    assert_eq!(metric(&session.metrics().await, "millrace_session_rate_limited_total"), 5.0);
    // Rate-limited turns are never pending in the conversation.
    let stored = bus.stored("bob", "s").await.unwrap();
    assert_eq!(stored.pending.len(), 3);

    // The limited queries come again under ids the stream no longer knows (as after a broker
    // restart): their requests have ended, so they count no usage and touch no conversation.
    let replays = limited
        .keys()
        .map(|id| Outbound { msg_id: format!("{id}/replayed"), ..Bus::admitted_message(id, "bob", "s", "hello") });
    bus.publisher.publish_all(replays).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while stream_len(bus.publisher.jetstream(), Edge::ADMITTED).await > 0 {
        assert!(Instant::now() < deadline, "the replays were not consumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(prompts.info().await.unwrap().num_pending, 0, "no prompt for an ended request");
    assert_eq!(metric(&session.metrics().await, "millrace_session_rate_limited_total"), 5.0);
    assert_eq!(bus.stored("bob", "s").await.unwrap(), stored, "the conversation is unchanged");
}

#[tokio::test]
async fn two_replicas_updating_one_conversation_lose_no_turn() {
    let nats = NatsServer::start().await.unwrap();
    let flags = ["--max-turns=1000", "--rate-per-s=0"];
    let a = Session::start(&nats, &flags).await;
    let b = Session::start(&nats, &flags).await;
    let mut bus = Bus::connect(&nats).await;
    let (user, sid) = ("frank", "busy");
    let n = 40;
    // Request order: each query's prompt is out before the next is sent.
    for i in 0..n {
        let p = bus.ask(&format!("q{i}"), user, sid, &format!("question {i}")).await;
        assert_eq!(p.turns_used, 0, "nothing has completed yet");
    }
    // Every answer twice (a redelivery), newest first, all at once: both replicas race on the
    // one key.
    let results = (0..n)
        .rev()
        .flat_map(|i| {
            let id = format!("q{i}");
            let answer = format!("answer {i}");
            [0, 1].map(|copy| Bus::result_message(&id, user, sid, TerminalStatus::Completed, &answer, copy))
        })
        .collect::<Vec<_>>();
    bus.publisher.publish_all(results).await.unwrap();

    let state = a.wait_turns(user, sid, 2 * n).await;
    let expected: Vec<(String, String, String)> = (0..n)
        .flat_map(|i| {
            [
                ("user".to_owned(), format!("question {i}"), format!("q{i}")),
                ("assistant".to_owned(), format!("answer {i}"), format!("q{i}")),
            ]
        })
        .collect();
    let got: Vec<(String, String, String)> =
        state.turns.iter().map(|t| (t.role.clone(), t.content.clone(), t.request_id.clone())).collect();
    assert_eq!(got, expected, "every turn exactly once, in request order");
    // Both replicas see the same state, and it stays put (no late duplicate appends).
    assert_eq!(b.get(user, sid).await.unwrap().turns.len(), 2 * n);
    assert!(bus.stored(user, sid).await.unwrap().pending.is_empty());
    let ids: BTreeSet<&str> = state.turns.iter().map(|t| t.request_id.as_str()).collect();
    assert_eq!(ids.len(), n);
    // Each exchange was stored once, by whichever replica won (the counter follows the write).
    let stored = |m: &str| metric(m, "millrace_session_turns_stored_total");
    let deadline = Instant::now() + WAIT;
    let (ma, mb) = loop {
        let (ma, mb) = (a.metrics().await, b.metrics().await);
        let total = stored(&ma) + stored(&mb);
        assert!(total <= n as f64, "{total} exchanges stored for {n} requests");
        if total == n as f64 {
            break (ma, mb);
        }
        assert!(Instant::now() < deadline, "only {total} exchanges counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let conflicts =
        metric(&ma, "millrace_session_cas_conflicts_total") + metric(&mb, "millrace_session_cas_conflicts_total");
    eprintln!(
        "exchanges stored by replica a: {}, b: {}; compare-and-set conflicts retried: {conflicts}",
        stored(&ma),
        stored(&mb)
    );
}
