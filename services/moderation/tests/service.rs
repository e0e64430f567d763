//! The moderation service against a real nats-server, run as the deployed binary, with the real
//! sink binary storing what it ends. Needs `models/prepared/manifest.json`
//! (`scripts/prepare-models.sh`) and the `sink` binary (`cargo build --workspace --bins`).
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use millrace_bus::publisher::Outbound;
use millrace_bus::topology::Edge;
use millrace_bus::{Dedup, Publisher};
use millrace_proto::Message as _;
use millrace_proto::v1::moderation_client::ModerationClient;
use millrace_proto::v1::{
    AdmittedQuery, CheckRequest, CheckResponse, CleanedQuery, Completion, RequestContext, StageTiming, Timings, Verdict,
};
use millrace_testkit::bus::{publisher, stream_messages};
use millrace_testkit::sink::Sink;
use millrace_testkit::{NatsServer, ServiceProcess, models_dir};
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;

const READY: Duration = Duration::from_secs(60);

struct Moderation {
    process: ServiceProcess,
}

impl Moderation {
    async fn start(nats: &NatsServer, extra: &[String]) -> Moderation {
        let mut args = vec![
            format!("--nats-url={}", nats.url()),
            format!("--models-dir={}", models_dir().display()),
            "--classifier-sessions=1".to_owned(),
        ];
        args.extend(extra.iter().cloned());
        let process = ServiceProcess::start("moderation", &args, &["--grpc-addr"], READY).await.unwrap();
        Moderation { process }
    }

    async fn client(&self) -> ModerationClient<Channel> {
        ModerationClient::connect(format!("http://{}", self.process.addr("--grpc-addr"))).await.unwrap()
    }

    async fn check(&self, text: &str, stage: &str) -> CheckResponse {
        let request = CheckRequest { text: text.into(), stage: stage.into() };
        self.client().await.check(request).await.unwrap().into_inner()
    }

    /// Polls `Check` until `text` gets `action` (a reload is asynchronous).
    async fn wait_action(&self, text: &str, action: &str, timeout: Duration) -> CheckResponse {
        let deadline = Instant::now() + timeout;
        loop {
            let response = self.check(text, "input").await;
            if response.action == action {
                return response;
            }
            assert!(Instant::now() < deadline, "{text:?} still {response:?}; log:\n{}", self.process.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn count_in_log(&self, needle: &str) -> usize {
        self.process.logs().matches(needle).count()
    }
}

fn ctx(request_id: &str) -> Option<RequestContext> {
    Some(RequestContext {
        request_id: request_id.into(),
        user: "alice".into(),
        tenant: "t".into(),
        model: "m".into(),
        ..Default::default()
    })
}

fn timings(stage: &str) -> Option<Timings> {
    Some(Timings { stages: vec![StageTiming { stage: stage.into(), received_unix_us: 10, finished_unix_us: 20 }] })
}

async fn send_query(publisher: &Publisher, request_id: &str, text: &str) {
    let query = CleanedQuery {
        ctx: ctx(request_id),
        timings: timings("preprocess"),
        text: text.into(),
        token_count: 6,
        ..Default::default()
    };
    let out = Outbound {
        subject: Edge::CLEAN.subject_for(request_id),
        msg_id: Dedup::Stage("preprocess").msg_id(request_id),
        payload: query.encode_to_vec().into(),
    };
    publisher.publish(out).await.unwrap();
}

async fn send_completion(publisher: &Publisher, request_id: &str, text: &str) {
    let completion = Completion {
        ctx: ctx(request_id),
        timings: timings("inference"),
        prompt: "<|im_start|>user\nTell me something<|im_end|>\n".into(),
        user_text: "Tell me something".into(),
        text: text.into(),
        prompt_tokens: 12,
        completion_tokens: 8,
        model_version: "mv1".into(),
        finish_reason: "eos".into(),
        verdicts: vec![Verdict { stage: "input".into(), action: "allow".into(), ..Default::default() }],
        turns_dropped: 0,
        logprobs: vec![],
        prompt_tokens_cached: 0,
    };
    let out = Outbound {
        subject: Edge::COMPLETIONS.subject_for(request_id),
        msg_id: Dedup::Stage("inference").msg_id(request_id),
        payload: completion.encode_to_vec().into(),
    };
    publisher.publish(out).await.unwrap();
}

/// Every message on `ADMITTED`, by request id, with its `Nats-Msg-Id`.
async fn admitted(publisher: &Publisher) -> HashMap<String, (String, AdmittedQuery)> {
    let mut found = HashMap::new();
    for (id, query) in stream_messages::<AdmittedQuery>(publisher.jetstream(), Edge::ADMITTED).await {
        let previous = found.insert(query.ctx.clone().unwrap().request_id, (id, query));
        assert!(previous.is_none(), "two admitted messages for one request");
    }
    found
}

fn stages(row: &Value) -> Vec<&str> {
    row["timings"].as_array().unwrap().iter().map(|t| t["stage"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn input_and_output_moderation_end_in_the_sink() {
    let nats = NatsServer::start().await.expect("nats-server");
    let sink = Sink::start(&nats).await.expect("sink (built by `cargo build --workspace --bins`)");
    let moderation = Moderation::start(&nats, &[]).await;
    let publisher = publisher(&nats).await;

    // (1) Input: an abusive query is blocked, a benign one (and a mildly profane one, flagged)
    // goes on to ADMITTED with its verdicts.
    send_query(&publisher, "in-abusive", "f u c k you, you worthless piece of sh1t").await;
    send_query(&publisher, "in-benign", "What is the capital of France?").await;
    send_query(&publisher, "in-flagged", "damn, this printer is broken again").await;
    let row = sink.row("in-abusive").await;
    assert_eq!((row["status"].as_str(), row["stage"].as_str()), (Some("BLOCKED_INPUT"), Some("moderation-input")));
    assert_eq!(row["reason"], "abuse");
    assert_eq!(row["prompt"], "f u c k you, you worthless piece of sh1t");
    assert!(row["completion"].as_str().unwrap().contains("content policy"), "{row}");
    assert_eq!(row["verdicts"][0]["action"], "block");
    assert_eq!(row["verdicts"][0]["stage"], "input");
    assert_eq!(stages(&row), ["preprocess", "moderation-input"]);

    let deadline = Instant::now() + Duration::from_secs(30);
    let admitted = loop {
        let admitted = admitted(&publisher).await;
        if admitted.len() >= 2 || Instant::now() > deadline {
            break admitted;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!admitted.contains_key("in-abusive"), "a blocked query must not be admitted");
    let (id, benign) = &admitted["in-benign"];
    assert_eq!(id, "in-benign/moderation-input");
    assert_eq!((benign.text.as_str(), benign.token_count), ("What is the capital of France?", 6));
    assert_eq!(benign.verdicts.len(), 1);
    assert_eq!((benign.verdicts[0].stage.as_str(), benign.verdicts[0].action.as_str()), ("input", "allow"));
    let timing: Vec<_> = benign.timings.as_ref().unwrap().stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(timing, ["preprocess", "moderation-input"]);
    let (_, flagged) = &admitted["in-flagged"];
    assert_eq!((flagged.verdicts[0].category.as_str(), flagged.verdicts[0].action.as_str()), ("profanity", "flag"));

    // (2) Output: an abusive completion is replaced by the refusal, a benign one completes.
    send_completion(&publisher, "out-abusive", "You are a pathetic idiot and I will kill you.").await;
    send_completion(&publisher, "out-benign", "The capital of France is Paris.").await;
    let row = sink.row("out-abusive").await;
    assert_eq!((row["status"].as_str(), row["stage"].as_str()), (Some("BLOCKED_OUTPUT"), Some("moderation-output")));
    assert!(row["completion"].as_str().unwrap().starts_with("I'm sorry, but I can't help with that."), "{row}");
    assert!(["abuse", "threats"].contains(&row["reason"].as_str().unwrap()), "{row}");
    assert!(row["detail"].as_str().unwrap().contains(row["reason"].as_str().unwrap()));
    let verdicts = row["verdicts"].as_array().unwrap();
    assert_eq!(verdicts[0]["stage"], "input", "the input's verdicts come first: {row}");
    assert!(verdicts.iter().any(|v| v["stage"] == "output" && v["action"] == "block"), "{row}");
    assert_eq!((row["completion_tokens"].as_u64(), row["model_version"].as_str()), (Some(8), Some("mv1")));

    let row = sink.row("out-benign").await;
    assert_eq!(
        (row["status"].as_str(), row["completion"].as_str()),
        (Some("COMPLETED"), Some("The capital of France is Paris."))
    );
    assert_eq!((row["prompt"].as_str(), row["reason"].as_str()), (Some("Tell me something"), Some("eos")));
    assert_eq!((row["prompt_tokens"].as_u64(), row["completion_tokens"].as_u64()), (Some(12), Some(8)));
    let verdicts: Vec<_> =
        row["verdicts"].as_array().unwrap().iter().map(|v| (v["stage"].as_str(), v["action"].as_str())).collect();
    assert_eq!(verdicts, [(Some("input"), Some("allow")), (Some("output"), Some("allow"))]);
    assert_eq!(stages(&row), ["inference", "moderation-output"]);

    // (4) gRPC Check: bad requests are INVALID_ARGUMENT with a code; a good one gets verdicts.
    let mut client = moderation.client().await;
    for (request, code) in [
        (CheckRequest { text: String::new(), stage: "input".into() }, "empty_text"),
        (CheckRequest { text: "hi".into(), stage: "middle".into() }, "unknown_stage"),
    ] {
        let status = client.check(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(status.metadata().get(millrace_proto::CODE_METADATA).unwrap(), code);
    }
    let r = moderation.check("contact me at bob@example.com", "output").await;
    assert_eq!((r.action.as_str(), r.verdicts[0].category.as_str()), ("flag", "pii_leak"));
    assert_eq!(moderation.check("contact me at bob@example.com", "input").await.action, "allow");
}

const POLICY_V1: &str = r#"
refusal = "Blocked by the test policy."

[categories.insults]
action = "block"
keywords = ["idiot"]
"#;

/// Replaces the file in one step, as an editor or a config-map update does.
fn write_policy(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn the_policy_reloads_when_its_file_changes_and_a_bad_one_is_refused() {
    let nats = NatsServer::start().await.expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    write_policy(&path, POLICY_V1);
    let moderation =
        Moderation::start(&nats, &[format!("--policy={}", path.display()), "--policy-poll-ms=200".into()]).await;
    let v1 = moderation.check("you idiot", "input").await;
    assert_eq!(v1.action, "block");
    assert_eq!(moderation.check("this is a flibbertigibbet", "input").await.action, "allow");

    // A new keyword in the block category: blocked once the file is seen to change.
    write_policy(&path, &POLICY_V1.replace(r#"["idiot"]"#, r#"["idiot", "flibbertigibbet"]"#));
    let v2 = moderation.wait_action("this is a flibbertigibbet", "block", Duration::from_secs(10)).await;
    assert_ne!(v2.policy_version, v1.policy_version);
    assert_eq!(v2.verdicts[0].rule, "keyword:flibbertigibbet");
    assert_eq!(moderation.count_in_log("policy reloaded"), 1, "{}", moderation.process.logs());

    // An invalid policy (bad regex) is refused in one log line; the previous one stays.
    write_policy(&path, &format!("{POLICY_V1}regexes = ['(unclosed']\n"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while moderation.count_in_log("policy refused") == 0 {
        assert!(Instant::now() < deadline, "no refusal logged:\n{}", moderation.process.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = moderation.process.logs();
    let refusal = logs.lines().find(|l| l.contains("policy refused")).unwrap();
    assert!(refusal.contains("bad regex") && refusal.contains(&v2.policy_version), "{refusal}");
    let still = moderation.check("this is a flibbertigibbet", "input").await;
    assert_eq!((still.action.as_str(), still.policy_version.as_str()), ("block", v2.policy_version.as_str()));
    // An unknown action is refused too, and the service keeps running and serving.
    write_policy(&path, &POLICY_V1.replace(r#""block""#, r#""deny""#));
    let deadline = Instant::now() + Duration::from_secs(10);
    while moderation.count_in_log("policy refused") < 2 {
        assert!(Instant::now() < deadline, "no second refusal:\n{}", moderation.process.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(moderation.check("you idiot", "input").await.policy_version, v2.policy_version);
    millrace_testkit::wait_http_ok(&format!("http://{}/readyz", moderation.process.admin()), Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_policy() {
    let nats = NatsServer::start().await.expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    write_policy(&path, POLICY_V1);
    // No polling: only the signal reloads.
    let mut moderation =
        Moderation::start(&nats, &[format!("--policy={}", path.display()), "--policy-poll-ms=0".into()]).await;
    write_policy(&path, &POLICY_V1.replace(r#"["idiot"]"#, r#"["idiot", "flibbertigibbet"]"#));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(moderation.check("a flibbertigibbet", "input").await.action, "allow", "not reloaded before SIGHUP");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(moderation.process.pid().unwrap() as i32, libc::SIGHUP) };
    moderation.wait_action("a flibbertigibbet", "block", Duration::from_secs(10)).await;
    assert!(moderation.process.logs().contains("SIGHUP"));
    let status = moderation.process.terminate(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status:?}");
}
