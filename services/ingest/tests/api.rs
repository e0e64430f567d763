//! The `ingest` binary end to end, as deployed: a child process against a real `nats-server -js`,
//! driven over HTTP and gRPC, with what it published read back from the streams.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use millrace_bus::topology::Edge;
use millrace_proto::Message;
use millrace_proto::v1::ingest_client::IngestClient;
use millrace_proto::v1::{GenerationParams, Query, Result as TerminalResult, SubmitRequest, TerminalStatus};
use millrace_testkit::sink::Sink;
use millrace_testkit::{NatsServer, ServiceProcess, bus};
use reqwest::StatusCode;
use serde_json::{Value, json};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One ingest process and the NATS server it publishes to.
struct Harness {
    // Declared first so it is dropped (killed) before its NATS server.
    ingest: ServiceProcess,
    nats: NatsServer,
    http: SocketAddr,
    grpc: SocketAddr,
    client: reqwest::Client,
}

impl Harness {
    async fn start(extra_args: &[String]) -> Self {
        Self::start_on(NatsServer::start().await.expect("nats-server"), extra_args).await
    }

    async fn start_on(nats: NatsServer, extra_args: &[String]) -> Self {
        let mut args = vec![format!("--nats-url={}", nats.url())];
        if !extra_args.iter().any(|a| a.starts_with("--stream-storage")) {
            args.push("--stream-storage=memory".to_owned());
        }
        args.extend_from_slice(extra_args);
        let ingest = ServiceProcess::start("ingest", &args, &["--http-addr", "--grpc-addr"], READY_TIMEOUT)
            .await
            .expect("ingest ready");
        let (http, grpc) = (ingest.addr("--http-addr"), ingest.addr("--grpc-addr"));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        Self { ingest, nats, http, grpc, client }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// `POST /v1/queries` with exactly these headers.
    async fn post(&self, body: impl Into<reqwest::Body>, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self.client.post(self.url("/v1/queries"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(body).send().await.expect("POST /v1/queries")
    }

    /// `POST /v1/queries` with a JSON body and any further headers.
    async fn submit_with(&self, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
        let json = [("content-type", "application/json")];
        self.post(body.to_string(), &[&json[..], headers].concat()).await
    }

    async fn submit(&self, body: &Value) -> reqwest::Response {
        self.submit_with(body, &[]).await
    }

    /// Every message on `edge`, decoded, with its `Nats-Msg-Id` (read on a connection of the
    /// test's own: ingest provisions the streams, with this test's flags).
    async fn stream_messages<M: Message + Default>(&self, edge: Edge) -> Vec<(String, M)> {
        let js = jetstream::new(async_nats::connect(self.nats.url()).await.expect("connect"));
        bus::stream_messages(&js, edge).await
    }

    async fn queries(&self) -> Vec<(String, Query)> {
        self.stream_messages(Edge::QUERIES).await
    }
}

fn good() -> Value {
    json!({ "user": "alice", "text": "What is a millrace?" })
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

/// Asserts `response` is the error `code` with `status` and a human message.
async fn assert_error(response: reqwest::Response, status: u16, code: &str, case: &str) {
    assert_eq!(response.status().as_u16(), status, "{case}");
    let body = json_of(response).await;
    assert_eq!(body["error"]["code"], code, "{case}: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{case}: {body}");
}

#[tokio::test]
async fn an_accepted_query_is_on_the_stream_with_its_context() {
    let mut h = Harness::start(&[]).await;
    let body = json!({
        "user": "alice",
        "session": "s-1",
        "text": "What is a millrace?",
        "params": { "max_new_tokens": 32, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "seed": 7, "stop": ["\n"] },
        "deadline_ms": 5000,
        "priority": 2,
    });
    let response = h.submit_with(&body, &[("X-Tenant", "acme")]).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let header_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let answer = json_of(response).await;
    assert_eq!(answer["status"], "ACCEPTED");
    assert_eq!(answer["request_id"], header_id.as_str());
    assert_eq!(uuid::Uuid::parse_str(&header_id).unwrap().get_version_num(), 7);

    let queries = h.queries().await;
    assert_eq!(queries.len(), 1);
    let (msg_id, query) = &queries[0];
    assert_eq!(msg_id, &format!("{header_id}/ingest"));
    assert_eq!(query.text, "What is a millrace?");
    let ctx = query.ctx.as_ref().unwrap();
    assert_eq!(ctx.request_id, header_id);
    assert_eq!((ctx.tenant.as_str(), ctx.user.as_str(), ctx.session.as_str()), ("acme", "alice", "s-1"));
    assert_eq!(ctx.model, "smollm2-135m");
    assert_eq!(ctx.priority, 2);
    assert_eq!(ctx.deadline_unix_ms - ctx.accepted_unix_ms, 5000);
    assert!((ctx.accepted_unix_ms - millrace_proto::now_unix_ms()).abs() < 60_000);
    let params = GenerationParams {
        max_new_tokens: 32,
        temperature: Some(0.5),
        top_p: Some(0.9),
        top_k: 20,
        seed: Some(7),
        stop: vec!["\n".into()],
        ..Default::default()
    };
    assert_eq!(ctx.params.as_ref(), Some(&params));
    let stages = &query.timings.as_ref().unwrap().stages;
    assert_eq!(stages.len(), 1);
    assert_eq!(stages[0].stage, "ingest");
    assert!(stages[0].finished_unix_us >= stages[0].received_unix_us);

    let exit = h.ingest.terminate(Duration::from_secs(15)).await.expect("drains on SIGTERM");
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_is_the_same_request() {
    let h = Harness::start(&[]).await;
    let key = [("Idempotency-Key", "order-42")];
    let first = h.submit_with(&good(), &key).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first = json_of(first).await;
    let retry = h.submit_with(&good(), &key).await;
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(retry.headers()["x-request-id"].to_str().unwrap(), first["request_id"]);
    let retry = json_of(retry).await;
    assert_eq!(retry, json!({ "request_id": first["request_id"], "status": "DUPLICATE" }));
    assert_eq!(first["status"], "ACCEPTED");
    assert_eq!(h.queries().await.len(), 1, "the retry published nothing new");

    let other_tenant = h.submit_with(&good(), &[key[0], ("X-Tenant", "other")]).await;
    assert_eq!(other_tenant.status(), StatusCode::ACCEPTED, "keys are per tenant");
}

/// The defect a restart exposed: the stream's duplicate window is rebuilt from the messages
/// still stored, so a key whose query was processed (and deleted by interest retention) was
/// accepted again after a broker restart. The ledger remembers it.
#[tokio::test]
async fn a_key_accepted_before_a_broker_restart_is_still_a_duplicate_after_it() {
    let mut h = Harness::start(&["--stream-storage=file".to_owned()]).await;
    let key = [("Idempotency-Key", "before-the-restart")];
    let first = h.submit_with(&good(), &key).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let id = json_of(first).await["request_id"].as_str().unwrap().to_owned();
    // Processed: every reader acked it and interest retention deleted it.
    let js = jetstream::new(async_nats::connect(h.nats.url()).await.unwrap());
    bus::stream(&js, Edge::QUERIES).await.purge().await.unwrap();
    h.nats.restart().await.expect("nats-server restarts on its store");

    let deadline = Instant::now() + Duration::from_secs(20);
    let retry = loop {
        let retry = h.submit_with(&good(), &key).await;
        if retry.status() != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break retry;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(json_of(retry).await, json!({ "request_id": id, "status": "DUPLICATE" }));
    assert!(h.queries().await.is_empty(), "the retry published nothing");
    let fresh = h.submit_with(&good(), &[("Idempotency-Key", "after-the-restart")]).await;
    assert_eq!(fresh.status(), StatusCode::ACCEPTED, "a new key is a new request");
}

#[tokio::test]
async fn every_bad_input_gets_its_own_status_and_code_and_nothing_else_breaks() {
    let h = Harness::start(&[]).await;
    let with = |field: &str, value: Value| {
        let mut body = good();
        body[field] = value;
        body.to_string().into_bytes()
    };
    let json_bytes = |body: Value| body.to_string().into_bytes();
    let body_cases = [
        ("unparseable", b"{\"user\": \"alice\",".to_vec(), 400, "malformed_json"),
        ("empty body", Vec::new(), 400, "malformed_json"),
        ("user is a number", with("user", json!(5)), 400, "wrong_type"),
        ("body is an array", b"[1, 2]".to_vec(), 400, "wrong_type"),
        ("params not an object", with("params", json!("hot")), 400, "wrong_type"),
        ("negative max_new_tokens", with("params", json!({ "max_new_tokens": -1 })), 400, "wrong_type"),
        ("no user", json_bytes(json!({ "text": "hi" })), 400, "missing_field"),
        ("no text", json_bytes(json!({ "user": "alice" })), 400, "missing_field"),
        ("typo'd field", with("deadline", json!(5)), 400, "unknown_field"),
        ("typo'd param", with("params", json!({ "temp": 1 })), 400, "unknown_field"),
        ("empty text", with("text", json!("")), 422, "empty_text"),
        ("blank text", with("text", json!(" \n\t ")), 422, "empty_text"),
        ("8001 chars", with("text", json!("x".repeat(8001))), 422, "text_too_long"),
        ("latin-1 bytes", b"{\"user\": \"caf\xe9\", \"text\": \"hi\"}".to_vec(), 400, "invalid_utf8"),
        ("unknown model", with("model", json!("gpt-9")), 422, "unknown_model"),
        ("70 KB", with("text", json!("x".repeat(70_000))), 413, "body_too_large"),
        ("zero deadline", with("deadline_ms", json!(0)), 422, "bad_deadline"),
        ("negative deadline", with("deadline_ms", json!(-100)), 422, "bad_deadline"),
        ("fractional deadline", with("deadline_ms", json!(1.5)), 422, "bad_deadline"),
        ("deadline over max", with("deadline_ms", json!(600_001)), 422, "bad_deadline"),
        ("temperature 3", with("params", json!({ "temperature": 3.0 })), 422, "bad_params"),
        ("top_p 1.5", with("params", json!({ "top_p": 1.5 })), 422, "bad_params"),
        ("top_p 0", with("params", json!({ "top_p": 0 })), 422, "bad_params"),
        ("129-char user", with("user", json!("u".repeat(129))), 422, "bad_identifier"),
    ];
    for (case, body, status, code) in body_cases {
        assert_error(h.post(body, &[("content-type", "application/json")]).await, status, code, case).await;
    }
    let long_key = "k".repeat(201);
    let header_cases = [
        ("no content type", vec![], 415, "unsupported_media_type"),
        ("text/plain", vec![("content-type", "text/plain")], 415, "unsupported_media_type"),
        ("form", vec![("content-type", "application/x-www-form-urlencoded")], 415, "unsupported_media_type"),
        (
            "201-char key",
            vec![("content-type", "application/json"), ("idempotency-key", &long_key)],
            400,
            "bad_idempotency_key",
        ),
    ];
    for (case, headers, status, code) in header_cases {
        assert_error(h.post(good().to_string(), &headers).await, status, code, case).await;
    }
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let response = h.client.request(method.clone(), h.url("/v1/queries/not-a-uuid")).send().await.unwrap();
        assert_error(response, 400, "invalid_request_id", method.as_str()).await;
    }

    assert!(h.queries().await.is_empty(), "no bad input was published");
    assert_eq!(h.submit(&good()).await.status(), StatusCode::ACCEPTED);
    let vendor_json = [("content-type", "application/vnd.millrace+json; charset=utf-8")];
    assert_eq!(h.post(good().to_string(), &vendor_json).await.status(), StatusCode::ACCEPTED);
    assert_eq!(h.queries().await.len(), 2);
}

#[tokio::test]
async fn a_full_stream_answers_429_with_retry_after() {
    let h = Harness::start(&["--stream-max-msgs=3".to_owned()]).await;
    for n in 0..3 {
        assert_eq!(h.submit(&good()).await.status(), StatusCode::ACCEPTED, "submit {n}");
    }
    let refused = h.submit(&good()).await;
    assert_eq!(refused.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    assert_error(refused, 429, "overloaded", "fourth submit").await;
    assert_eq!(h.queries().await.len(), 3);
}

#[tokio::test]
async fn without_nats_submits_answer_503() {
    let mut h = Harness::start(&[]).await;
    h.nats.kill();
    // The client notices the dropped connection within moments; until then a publish can still
    // be attempted (and time out). Either way the answer must become 503.
    let deadline = Instant::now() + Duration::from_secs(15);
    let response = loop {
        let response = h.submit(&good()).await;
        if response.status() == StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break response;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_error(response, 503, "unavailable", "NATS down").await;
}

#[tokio::test]
async fn delete_publishes_a_terminal_cancel_and_the_cancel_notice() {
    let h = Harness::start(&[]).await;
    let id = json_of(h.submit(&good()).await).await["request_id"].as_str().unwrap().to_owned();
    let nats = async_nats::connect(h.nats.url()).await.unwrap();
    let mut notices = nats.subscribe(format!("mr.v1.cancel.{id}")).await.unwrap();
    nats.flush().await.unwrap();

    // Any UUID spelling names the same request.
    let cancel = h.client.delete(h.url(&format!("/v1/queries/{}", id.to_uppercase()))).send().await.unwrap();
    assert_eq!(cancel.status(), StatusCode::ACCEPTED);
    assert_eq!(json_of(cancel).await, json!({ "request_id": id, "status": "CANCELLING" }));
    tokio::time::timeout(Duration::from_secs(5), notices.next()).await.expect("cancel notice");

    let again = h.client.delete(h.url(&format!("/v1/queries/{id}"))).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let results: Vec<(String, TerminalResult)> = h.stream_messages(Edge::RESULTS).await;
    assert_eq!(results.len(), 1, "a repeated cancel is deduplicated");
    let (msg_id, result) = &results[0];
    assert_eq!(msg_id, &format!("{id}/outcome"));
    assert_eq!(result.status(), TerminalStatus::Cancelled);
    assert_eq!((result.reason.as_str(), result.stage.as_str()), ("cancelled_by_client", "ingest"));
    assert_eq!(result.ctx.as_ref().unwrap().request_id, id);
}

/// Status reads go to the real sink binary: pending until a terminal row exists, then the row;
/// an idempotent retry and a cancel still make exactly one row.
#[tokio::test]
async fn status_reads_come_from_the_sink() {
    let nats = NatsServer::start().await.expect("nats-server");
    let mut sink = Sink::start(&nats).await.expect("sink (built by `cargo build --workspace --bins`)");
    let sink_http = sink.http();
    let h = Harness::start_on(nats, &[format!("--sink-url=http://{sink_http}/")]).await;

    let key = [("idempotency-key", "status-read-1")];
    let id = json_of(h.submit_with(&good(), &key).await).await["request_id"].as_str().unwrap().to_owned();
    let retried = json_of(h.submit_with(&good(), &key).await).await;
    assert_eq!(retried["request_id"], id.as_str());
    let pending = h.client.get(h.url(&format!("/v1/queries/{id}"))).send().await.unwrap();
    assert_eq!(pending.status(), StatusCode::OK);
    assert_eq!(json_of(pending).await, json!({ "request_id": id, "status": "PENDING" }));

    h.client.delete(h.url(&format!("/v1/queries/{id}"))).send().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let row = loop {
        let row = json_of(h.client.get(h.url(&format!("/v1/queries/{id}"))).send().await.unwrap()).await;
        if row["status"] != "PENDING" || Instant::now() > deadline {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(row["status"], "CANCELLED");
    assert_eq!(row["reason"], "cancelled_by_client");
    let rows = json_of(h.client.get(format!("http://{sink_http}/v1/results")).send().await.unwrap()).await;
    assert_eq!(rows["results"].as_array().unwrap().len(), 1, "one request, one row: {rows}");

    sink.process.kill();
    let unreachable = h.client.get(h.url(&format!("/v1/queries/{id}"))).send().await.unwrap();
    assert_error(unreachable, 503, "results_unavailable", "sink down").await;
}

#[tokio::test]
async fn grpc_submit_validates_and_publishes_like_http() {
    let h = Harness::start(&[]).await;
    let mut client = IngestClient::connect(format!("http://{}", h.grpc)).await.expect("gRPC connect");
    let request = SubmitRequest {
        user: "bob".into(),
        text: "Hello over gRPC".into(),
        idempotency_key: "g-1".into(),
        deadline_ms: 2_000,
        ..Default::default()
    };
    let first = client.submit(request.clone()).await.expect("submit").into_inner();
    assert!(first.created);
    assert_eq!(uuid::Uuid::parse_str(&first.request_id).unwrap().get_version_num(), 5);
    let retry = client.submit(request).await.expect("retry").into_inner();
    assert_eq!((retry.request_id.as_str(), retry.created), (first.request_id.as_str(), false));

    let queries = h.queries().await;
    assert_eq!(queries.len(), 1);
    let ctx = queries[0].1.ctx.as_ref().unwrap();
    assert_eq!(
        (ctx.request_id.as_str(), ctx.user.as_str(), ctx.tenant.as_str()),
        (first.request_id.as_str(), "bob", "default")
    );
    assert_eq!((ctx.session.as_str(), ctx.model.as_str()), ("default", "smollm2-135m"));
    assert_eq!(ctx.deadline_unix_ms - ctx.accepted_unix_ms, 2_000);

    let invalid = SubmitRequest { user: "bob".into(), text: "   ".into(), ..Default::default() };
    let status = client.submit(invalid).await.expect_err("blank text is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("empty_text"), "{}", status.message());
    assert_eq!(status.metadata().get("x-millrace-code").unwrap(), "empty_text");
}

/// With API keys configured every API asks for one; the key's tenant is the request's tenant.
#[tokio::test]
async fn api_keys_guard_every_api_and_name_the_tenant() {
    use sha2::{Digest, Sha256};
    let digest = |key: &str| hex::encode(Sha256::digest(key.as_bytes()));
    let keys = format!("--api-keys={} acme,{} globex", digest("key-acme"), digest("key-globex"));
    let h = Harness::start(&[keys]).await;
    let bearer = |key: &str| format!("Bearer {key}");

    // Missing and wrong keys: 401 on the queries API, the OpenAI API and the WebSocket.
    assert_error(h.submit(&good()).await, 401, "missing_api_key", "no key").await;
    let wrong = bearer("key-nobody");
    assert_error(h.submit_with(&good(), &[("authorization", &wrong)]).await, 401, "invalid_api_key", "wrong key").await;
    for path in ["/v1/models", "/v1/ws", "/v1/queries/0190e5a0-0000-7000-8000-000000000000"] {
        let response = h.client.get(h.url(path)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{path}");
        let body = json_of(response).await;
        assert_eq!(
            (body["error"]["code"].as_str(), body["error"]["type"].as_str()),
            (Some("missing_api_key"), Some("invalid_request_error")),
            "{path}"
        );
    }
    let models = h.client.get(h.url("/v1/models")).header("authorization", bearer("key-globex")).send().await.unwrap();
    assert_eq!(models.status().as_u16(), 200);

    // The right key: accepted, and its tenant wins over X-Tenant.
    let acme = bearer("key-acme");
    let response = h.submit_with(&good(), &[("authorization", &acme), ("x-tenant", "globex")]).await;
    assert_eq!(response.status().as_u16(), 202);

    // gRPC: the key rides in metadata.
    let mut client = IngestClient::connect(format!("http://{}", h.grpc)).await.expect("gRPC connect");
    let request =
        SubmitRequest { user: "bob".into(), text: "Hello".into(), tenant: "acme".into(), ..Default::default() };
    let refused = client.submit(request.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut with_key = tonic::Request::new(request);
    with_key.metadata_mut().insert("authorization", bearer("key-globex").parse().unwrap());
    client.submit(with_key).await.expect("submit with a key");

    let tenants: Vec<String> = h.queries().await.into_iter().map(|(_, q)| q.ctx.unwrap().tenant).collect();
    assert_eq!(tenants, ["acme", "globex"]);
}

/// The queries API, the WebSocket and gRPC have OpenAI's stateless choice too: a submit may
/// carry earlier `messages` and ask for no server-side history.
#[tokio::test]
async fn a_stateless_submit_carries_its_messages_and_names_no_session() {
    let h = Harness::start(&[]).await;
    let body = json!({
        "user": "alice",
        "text": "And in winter?",
        "stateless": true,
        "messages": [{ "role": "system", "content": "Be brief." }, { "role": "user", "content": "Is Oslo cold?" }, { "role": "assistant", "content": "Yes." }],
    });
    assert_eq!(h.submit(&body).await.status().as_u16(), 202);
    let mut with_session = body.clone();
    with_session["session"] = json!("s1");
    assert_error(h.submit(&with_session).await, 422, "session_and_stateless", "stateless with a session").await;
    let mut bad_role = body.clone();
    bad_role["messages"][0]["role"] = json!("tool");
    assert_error(h.submit(&bad_role).await, 422, "bad_messages", "unknown role").await;

    let mut client = IngestClient::connect(format!("http://{}", h.grpc)).await.expect("gRPC connect");
    let turn = |role: &str, content: &str| millrace_proto::v1::ChatTurn { role: role.into(), content: content.into() };
    let request = SubmitRequest {
        user: "bob".into(),
        text: "Why?".into(),
        stateless: true,
        messages: vec![turn("user", "Is the sky blue?"), turn("assistant", "Yes.")],
        ..Default::default()
    };
    client.submit(request).await.expect("stateless gRPC submit");

    let queries = h.queries().await;
    assert_eq!(queries.len(), 2);
    for (_, q) in &queries {
        let ctx = q.ctx.as_ref().unwrap();
        assert!(ctx.stateless && ctx.session.is_empty(), "{ctx:?}");
    }
    let roles: Vec<&str> = queries[0].1.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant"]);
    assert_eq!(queries[1].1.messages.len(), 2);
}
