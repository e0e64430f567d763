//! The whole mesh end to end (NATS and all seven services as processes, SmolLM2 on ONNX
//! Runtime), through each streaming API: OpenAI SSE, WebSocket and gRPC `Generate`.
//!
//! - several users × several turns at once, one API each: every answer arrives, the streamed
//!   text is the stored completion, the session holds every turn and later prompts carry them
//!   (whose KV inference reuses from its prefix cache);
//! - blocked input and blocked output end as such, and a blocked output's words never reach
//!   the stream (a test policy blocks "Paris" in answers);
//! - closing a socket / dropping a gRPC stream cancels the request, and the cancel reaches
//!   batcher and inference;
//! - the ledger: after a burst of a few hundred submits (with cancels and bad input mixed in),
//!   every accepted id has exactly one terminal row, and nothing else is there.
//!
//! Needs `models/prepared` (`scripts/prepare-models.sh`) and every service binary built.
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use millrace_proto::v1::generate_event::Event as GenerateEventKind;
use millrace_proto::v1::ingest_client::IngestClient;
use millrace_proto::v1::sessions_client::SessionsClient;
use millrace_proto::v1::{GenerationParams, SessionKey, SubmitRequest, TerminalStatus};
use millrace_testkit::mesh::{Mesh, MeshOptions};
use millrace_testkit::metrics::metric;
use millrace_testkit::workspace_root;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const MODEL: &str = "smollm2-135m";
/// How long a stream's frames, and the burst's rows, may take.
const ROW_WAIT: Duration = Duration::from_secs(180);

/// The default policy plus a rule that blocks answers naming Paris.
fn test_policy(dir: &std::path::Path) -> String {
    let default = std::fs::read_to_string(workspace_root().join("services/moderation/policy/default.toml")).unwrap();
    let policy = format!(
        "{default}\n[categories.test-paris]\naction = \"block\"\ndescription = \"test: answers naming Paris\"\nkeywords = [\"paris\"]\nstages = [\"output\"]\n"
    );
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    format!("--policy={}", path.display())
}

async fn start_mesh(dir: &std::path::Path) -> Mesh {
    let options = MeshOptions {
        extra_args: vec![
            ("moderation", test_policy(dir)),
            // The burst below sends many requests per user; rate limiting is tested elsewhere.
            ("session", "--rate-per-s=1000".into()),
            ("session", "--burst=1000".into()),
        ],
        ..MeshOptions::default()
    };
    Mesh::start(options).await.expect("mesh")
}

/// What a streaming API returned for one request: its id, the text streamed, the terminal row.
#[derive(Debug)]
struct Streamed {
    request_id: String,
    text: String,
    status: String,
}

async fn stored_row(mesh: &Mesh, request_id: &str) -> Value {
    mesh.stored_row(request_id).await.expect("a stored row")
}

// --- the three streaming clients ---

async fn via_sse(mesh: &Mesh, user: &str, session: &str, text: &str) -> Streamed {
    let body = json!({
        "model": MODEL,
        "messages": [{ "role": "user", "content": text }],
        "temperature": 0,
        "max_tokens": 24,
        "user": user,
        "stream": true,
    });
    let response = reqwest::Client::new()
        .post(mesh.ingest_url("/v1/chat/completions"))
        .header("x-session-id", session)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body = response.text().await.unwrap();
    let (mut streamed, mut finish) = (String::new(), None);
    for event in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = event.strip_prefix("data: ").unwrap();
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let choice = &chunk["choices"][0];
        streamed.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_owned());
        }
    }
    let status = match finish.as_deref() {
        Some("stop" | "length") => "COMPLETED",
        Some("content_filter") => "BLOCKED",
        other => panic!("stream ended without a finish reason: {other:?} in {body}"),
    };
    Streamed { request_id, text: streamed, status: status.to_owned() }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn socket(mesh: &Mesh) -> Socket {
    let url = format!("ws://{}/v1/ws", mesh.ingest_http);
    tokio_tungstenite::connect_async(url).await.expect("websocket").0
}

async fn next_frame(socket: &mut Socket) -> Value {
    loop {
        match tokio::time::timeout(ROW_WAIT, socket.next()).await.expect("a frame in time") {
            Some(Ok(WsMessage::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("socket ended: {other:?}"),
        }
    }
}

async fn send_query(socket: &mut Socket, reference: &str, query: Value) {
    let frame = json!({ "type": "query", "ref": reference, "query": query });
    socket.send(WsMessage::text(frame.to_string())).await.unwrap();
}

/// One query on its own socket, followed to the result.
async fn via_ws(mesh: &Mesh, user: &str, session: &str, text: &str) -> Streamed {
    let mut socket = socket(mesh).await;
    let query = json!({ "text": text, "user": user, "session": session, "model": MODEL,
                        "params": { "max_new_tokens": 24, "temperature": 0 } });
    send_query(&mut socket, "q", query).await;
    let accepted = next_frame(&mut socket).await;
    assert_eq!((accepted["type"].as_str(), accepted["ref"].as_str()), (Some("accepted"), Some("q")), "{accepted}");
    let request_id = accepted["request_id"].as_str().unwrap().to_owned();
    let mut streamed = String::new();
    loop {
        let frame = next_frame(&mut socket).await;
        assert_eq!(frame["request_id"], request_id.as_str(), "{frame}");
        match frame["type"].as_str() {
            Some("token") => streamed.push_str(frame["text"].as_str().unwrap()),
            Some("result") => {
                let status = frame["result"]["status"].as_str().unwrap().to_owned();
                return Streamed { request_id, text: streamed, status };
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

async fn grpc_client(mesh: &Mesh) -> IngestClient<tonic::transport::Channel> {
    IngestClient::connect(format!("http://{}", mesh.ingest_grpc)).await.unwrap()
}

fn submit_request(user: &str, session: &str, text: &str, max_new_tokens: u32) -> SubmitRequest {
    SubmitRequest {
        user: user.into(),
        session: session.into(),
        text: text.into(),
        model: MODEL.into(),
        params: Some(GenerationParams { max_new_tokens, temperature: Some(0.0), ..Default::default() }),
        ..Default::default()
    }
}

async fn via_grpc(mesh: &Mesh, user: &str, session: &str, text: &str) -> Streamed {
    let response = grpc_client(mesh).await.generate(submit_request(user, session, text, 24)).await.unwrap();
    let request_id = response.metadata().get("x-request-id").unwrap().to_str().unwrap().to_owned();
    let mut events = response.into_inner();
    let Some(GenerateEventKind::Accepted(accepted)) = events.message().await.unwrap().unwrap().event else {
        panic!("the first event is not `accepted`")
    };
    assert_eq!(accepted.request_id, request_id);
    let mut streamed = String::new();
    while let Some(event) = events.message().await.unwrap() {
        match event.event.unwrap() {
            GenerateEventKind::Token(token) => streamed.push_str(&token.text),
            GenerateEventKind::Result(result) => {
                assert!(events.message().await.unwrap().is_none(), "the result is the last event");
                let status = TerminalStatus::try_from(result.status).unwrap().as_str_name().to_owned();
                return Streamed { request_id, text: streamed, status };
            }
            GenerateEventKind::Accepted(_) => panic!("accepted twice"),
        }
    }
    panic!("the stream ended without a result")
}

#[derive(Clone, Copy, Debug)]
enum Api {
    Sse,
    Ws,
    Grpc,
}

async fn ask(mesh: &Mesh, api: Api, user: &str, session: &str, text: &str) -> Streamed {
    match api {
        Api::Sse => via_sse(mesh, user, session, text).await,
        Api::Ws => via_ws(mesh, user, session, text).await,
        Api::Grpc => via_grpc(mesh, user, session, text).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_mesh_through_every_streaming_api() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path()).await;

    conversations(&mesh).await;
    blocked_input_and_output(&mesh).await;
    closing_a_socket_or_stream_cancels(&mesh).await;
    ledger_after_a_burst(&mesh).await;
}

/// Three users, three turns each, all at once; user k talks over API k.
async fn conversations(mesh: &Mesh) {
    const TURNS: [&str; 3] = ["My name is Ada and I like tea.", "What is two plus two?", "What is my name?"];
    let users = [("alice", Api::Sse), ("bob", Api::Ws), ("carol", Api::Grpc)];
    let started = Instant::now();
    let conversations = users.map(|(user, api)| async move {
        let mut answers = Vec::new();
        for turn in TURNS {
            answers.push(ask(mesh, api, user, "e2e", turn).await);
        }
        (user, api, answers)
    });
    for (user, api, answers) in futures::future::join_all(conversations).await {
        for (turn, answer) in TURNS.iter().zip(&answers) {
            assert_eq!(answer.status, "COMPLETED", "{user} over {api:?}, {turn:?}: {answer:?}\n{}", mesh.logs());
            let row = stored_row(mesh, &answer.request_id).await;
            assert_eq!(row["status"], "COMPLETED");
            assert!(!answer.text.is_empty(), "{user} over {api:?}: nothing streamed");
            assert_eq!(answer.text, row["completion"].as_str().unwrap(), "{user} over {api:?}: streamed ≠ stored");
            assert_eq!(row["user"], user);
        }
        // The conversation the session service keeps holds every turn, in order, and the prompt it built for
        // the last turn was longer than the first two turns together: it carried them.
        let key = SessionKey { tenant: "default".into(), user: user.into(), session: "e2e".into() };
        let state = SessionsClient::connect(format!("http://{}", mesh.session_grpc))
            .await
            .unwrap()
            .get(key)
            .await
            .unwrap()
            .into_inner();
        let turns: Vec<(&str, &str)> = state.turns.iter().map(|t| (t.role.as_str(), t.request_id.as_str())).collect();
        let expected: Vec<(&str, &str)> = answers
            .iter()
            .flat_map(|a| [("user", a.request_id.as_str()), ("assistant", a.request_id.as_str())])
            .collect();
        assert_eq!(turns, expected, "{user}: {state:?}");
        assert_eq!(state.turns[0].content, TURNS[0]);
        let mut rows = Vec::new();
        for answer in &answers {
            rows.push(stored_row(mesh, &answer.request_id).await);
        }
        let tokens = |i: usize, field: &str| rows[i][field].as_u64().unwrap();
        let earlier = tokens(0, "prompt_tokens") + tokens(0, "completion_tokens") + tokens(1, "completion_tokens");
        let last = tokens(2, "prompt_tokens");
        assert!(last > earlier, "{user}: the last prompt ({last} tokens) cannot hold the earlier turns ({earlier})");
        // Inference kept the conversation's KV: the last turn computed only what is new.
        let reused = tokens(2, "prompt_tokens_cached");
        assert!(reused > tokens(0, "prompt_tokens"), "{user}: turn 3 reused {reused} of {last} prompt tokens");
        eprintln!("{user} over {api:?}: {:?}", answers.iter().map(|a| a.text.as_str()).collect::<Vec<_>>());
    }
    eprintln!("3 users × 3 turns in {:.1} s", started.elapsed().as_secs_f64());
}

async fn blocked_input_and_output(mesh: &Mesh) {
    for api in [Api::Sse, Api::Ws, Api::Grpc] {
        let blocked = ask(mesh, api, "mallory", &format!("blocked-in-{api:?}"), "you are a worthless idiot").await;
        assert!(blocked.status.starts_with("BLOCKED"), "{api:?}: {blocked:?}");
        let row = stored_row(mesh, &blocked.request_id).await;
        assert_eq!(row["status"], "BLOCKED_INPUT", "{api:?}");
        assert_eq!(blocked.text, row["completion"].as_str().unwrap(), "{api:?}: the refusal is streamed");

        // The model answers "Paris"; the test policy blocks it in answers. The stream may carry
        // the moderated words before it, never the blocked one.
        let blocked =
            ask(mesh, api, "mallory", &format!("blocked-out-{api:?}"), "What is the capital of France?").await;
        let row = stored_row(mesh, &blocked.request_id).await;
        assert_eq!(row["status"], "BLOCKED_OUTPUT", "{api:?}: {row}");
        assert!(blocked.status.starts_with("BLOCKED"), "{api:?}: {blocked:?}");
        assert!(!blocked.text.to_lowercase().contains("paris"), "{api:?}: unmoderated output streamed: {blocked:?}");
        eprintln!("{api:?}: blocked output streamed {:?}", blocked.text);
    }
}

/// A request that generates for long; returns once its first text arrived.
const LONG: &str = "Write a very long story about a dragon who learns to bake bread.";

/// The cancel notices the batcher has heard (absent: 0).
fn cancel_notices(batcher_metrics: &str) -> f64 {
    metric(batcher_metrics, "millrace_batcher_cancel_notices_total", &[]).unwrap_or(0.0)
}

async fn closing_a_socket_or_stream_cancels(mesh: &Mesh) {
    let batcher_before = cancel_notices(&mesh.metrics("batcher").await.unwrap());

    // WebSocket: two long queries on one socket; closing it after the first text cancels both.
    let mut socket = socket(mesh).await;
    for reference in ["a", "b"] {
        let query = json!({ "text": LONG, "user": "closer", "session": reference, "model": MODEL,
                            "params": { "max_new_tokens": 1000 } });
        send_query(&mut socket, reference, query).await;
    }
    let mut ids = Vec::new();
    loop {
        let frame = next_frame(&mut socket).await;
        match frame["type"].as_str() {
            Some("accepted") => ids.push(frame["request_id"].as_str().unwrap().to_owned()),
            Some("token") if ids.len() == 2 => break,
            Some("token") => {}
            _ => panic!("unexpected frame {frame}"),
        }
    }
    socket.close(None).await.unwrap();
    drop(socket);

    // gRPC: dropping the stream after the first text cancels.
    let response = grpc_client(mesh).await.generate(submit_request("closer", "c", LONG, 1000)).await.unwrap();
    let mut events = response.into_inner();
    let Some(GenerateEventKind::Accepted(accepted)) = events.message().await.unwrap().unwrap().event else {
        panic!("the first event is not `accepted`")
    };
    ids.push(accepted.request_id);
    while !matches!(events.message().await.unwrap().unwrap().event, Some(GenerateEventKind::Token(_))) {}
    drop(events);

    for id in &ids {
        let row = stored_row(mesh, id).await;
        assert_eq!(row["status"], "CANCELLED", "{id}: {row}");
    }
    // The notices reached the batcher, and the engine stopped the running generations.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let batcher = cancel_notices(&mesh.metrics("batcher").await.unwrap());
        let inference = mesh.metrics("inference").await.unwrap();
        let stopped =
            metric(&inference, "millrace_inference_generations_total", &[("finish", "cancelled")]).unwrap_or(0.0);
        if batcher - batcher_before >= 3.0 && stopped >= 1.0 {
            eprintln!("cancel notices at the batcher: {}, generations stopped: {stopped}", batcher - batcher_before);
            break;
        }
        assert!(Instant::now() < deadline, "cancels did not arrive: batcher {batcher}, inference stopped {stopped}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A burst of submits over `POST /v1/queries` from 20 users, with cancels and bad input mixed
/// in; then every accepted id has exactly one row, and the users' rows are exactly those ids.
async fn ledger_after_a_burst(mesh: &Mesh) {
    const REQUESTS: usize = 300;
    const USERS: usize = 20;
    let client = reqwest::Client::new();
    let run = format!("ledger-{}", std::process::id());
    let started = Instant::now();
    let submits = (0..REQUESTS).map(|i| {
        let client = client.clone();
        let user = format!("{run}-{}", i % USERS);
        async move {
            // A deadline long enough for a debug build on two cores to work through the burst.
            let body = json!({ "text": format!("Say hello number {i}."), "user": user, "model": MODEL,
                               "params": { "max_new_tokens": 2 }, "deadline_ms": 150_000 });
            let response = client.post(mesh.ingest_url("/v1/queries")).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 202);
            let body: Value = response.json().await.unwrap();
            let id = body["request_id"].as_str().unwrap().to_owned();
            // Every 15th is cancelled at once: the cancel races the answer, one of them wins.
            if i % 15 == 0 {
                let response = client.delete(mesh.ingest_url(&format!("/v1/queries/{id}"))).send().await.unwrap();
                assert_eq!(response.status(), 202);
            }
            (id, user)
        }
    });
    let bad = (0..10).map(|i| {
        let client = client.clone();
        async move {
            let body = if i % 2 == 0 { json!({ "text": "" }) } else { json!({ "text": "x", "model": "nope" }) };
            let response = client.post(mesh.ingest_url("/v1/queries")).json(&body).send().await.unwrap();
            assert!(response.status().is_client_error());
            assert!(response.headers().contains_key("x-request-id"), "every answer carries a request id");
        }
    });
    let (accepted, _) = futures::future::join(futures::future::join_all(submits), futures::future::join_all(bad)).await;
    let accepted: HashMap<String, String> = accepted.into_iter().collect();
    assert_eq!(accepted.len(), REQUESTS, "ids are unique");

    // Every row of the run's users, page by page; a request cancelled by id alone (DELETE) has a
    // row without its user, so ids the listing lacks are looked up one by one.
    let deadline = Instant::now() + ROW_WAIT;
    let (rows, statuses, missing) = loop {
        let mut rows: HashMap<String, usize> = HashMap::new();
        let mut statuses: HashMap<String, usize> = HashMap::new();
        for user in accepted.values().collect::<HashSet<_>>() {
            let mut token = String::new();
            loop {
                let url = mesh.sink_url(&format!("/v1/results?user={user}&page_size=100&page_token={token}"));
                let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
                for row in page["results"].as_array().unwrap() {
                    *rows.entry(row["request_id"].as_str().unwrap().to_owned()).or_default() += 1;
                    *statuses.entry(row["status"].as_str().unwrap().to_owned()).or_default() += 1;
                }
                token = page["next_page_token"].as_str().unwrap_or_default().to_owned();
                if token.is_empty() {
                    break;
                }
            }
        }
        let mut missing = Vec::new();
        for id in accepted.keys().filter(|id| !rows.contains_key(*id)) {
            let response = client.get(mesh.sink_url(&format!("/v1/results/{id}"))).send().await.unwrap();
            if response.status() == 200 {
                let row: Value = response.json().await.unwrap();
                *statuses.entry(row["status"].as_str().unwrap().to_owned()).or_default() += 1;
            } else {
                missing.push(id.clone());
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break (rows, statuses, missing);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(missing.is_empty(), "{} accepted ids have no row: {missing:?}", missing.len());
    let duplicated: Vec<_> = rows.iter().filter(|(_, n)| **n > 1).collect();
    let unknown: Vec<_> = rows.keys().filter(|id| !accepted.contains_key(*id)).collect();
    assert!(duplicated.is_empty(), "ids with several rows: {duplicated:?}");
    assert!(unknown.is_empty(), "rows no one submitted: {unknown:?}");
    assert!(statuses.get("COMPLETED").copied().unwrap_or_default() > REQUESTS / 2, "{statuses:?}");
    let stored: usize = statuses.values().sum();
    assert_eq!(stored, REQUESTS);
    eprintln!("ledger: {REQUESTS} accepted = {stored} rows, {statuses:?}, in {:.1} s", started.elapsed().as_secs_f64());
}
