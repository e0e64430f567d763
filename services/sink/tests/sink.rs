//! The sink against a real nats-server and real databases, run as the deployed binary.
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use millrace_bus::publisher::Outbound;
use millrace_bus::topology::Edge;
use millrace_bus::{Dedup, Publisher};
use millrace_proto::Message as _;
use millrace_proto::v1::results_client::ResultsClient;
use millrace_proto::v1::{
    GetResultRequest, ListResultsRequest, RequestContext, Result as TerminalResult, StageTiming, TerminalStatus,
    Timings,
};
use millrace_testkit::bus::publisher;
use millrace_testkit::metrics::metric;
use millrace_testkit::{NatsServer, ServiceProcess, postgres_url};
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const READY: Duration = Duration::from_secs(30);

struct Sink {
    process: ServiceProcess,
}

impl Sink {
    async fn start(nats: &NatsServer, database_url: &str, extra: &[&str]) -> Sink {
        let mut args = vec![
            format!("--nats-url={}", nats.url()),
            format!("--database-url={database_url}"),
            "--ack-wait-s=2".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = ServiceProcess::start("sink", &args, &["--http-addr", "--grpc-addr"], READY).await.unwrap();
        Sink { process }
    }

    /// Starts the same sink again (same database), minus any fault flags.
    async fn restart(&mut self) {
        let args: Vec<String> = self.process.args().iter().filter(|a| !a.starts_with("--fault")).cloned().collect();
        self.process.restart(args, READY).await.unwrap();
    }

    fn http(&self) -> SocketAddr {
        self.process.addr("--http-addr")
    }

    fn grpc(&self) -> SocketAddr {
        self.process.addr("--grpc-addr")
    }

    async fn get(&self, request_id: &str) -> (u16, Value) {
        let r = reqwest::get(format!("http://{}/v1/results/{request_id}", self.http())).await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// Polls until every id has a row (or fails after `timeout`).
    async fn wait_rows(&self, ids: &[String], timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        for id in ids {
            while self.get(id).await.0 != 200 {
                assert!(std::time::Instant::now() < deadline, "no row for {id}; sink log:\n{}", self.process.logs());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    async fn list_all(&self, query: &str) -> Vec<Value> {
        let mut rows = Vec::new();
        let mut token = String::new();
        loop {
            let url = format!("http://{}/v1/results?{query}&page_size=50&page_token={token}", self.http());
            let page: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            rows.extend(page["results"].as_array().unwrap().iter().cloned());
            token = page["next_page_token"].as_str().unwrap().to_owned();
            if token.is_empty() {
                return rows;
            }
        }
    }
}

fn result(request_id: &str, user: &str, status: TerminalStatus) -> TerminalResult {
    TerminalResult {
        ctx: Some(RequestContext {
            request_id: request_id.into(),
            user: user.into(),
            tenant: "t".into(),
            model: "m".into(),
            ..Default::default()
        }),
        timings: Some(Timings {
            stages: vec![StageTiming { stage: "inference".into(), received_unix_us: 10, finished_unix_us: 20 }],
        }),
        status: status as i32,
        completion: format!("answer for {request_id}"),
        stage: "test".into(),
        turns_dropped: 3,
        prompt_tokens: 11,
        prompt_tokens_cached: 5,
        ..Default::default()
    }
}

fn outbound(stage: &str, r: &TerminalResult) -> Outbound {
    let id = &r.ctx.as_ref().unwrap().request_id;
    Outbound {
        subject: Edge::RESULTS.subject_for(id),
        msg_id: Dedup::Stage(stage).msg_id(id),
        payload: r.encode_to_vec().into(),
    }
}

/// Publishes `n` COMPLETED results for users u0..u4 and returns their ids.
async fn publish_results(publisher: &Publisher, prefix: &str, n: usize) -> Vec<String> {
    let results: Vec<_> =
        (0..n).map(|i| result(&format!("{prefix}-{i}"), &format!("u{}", i % 5), TerminalStatus::Completed)).collect();
    let outs: Vec<Outbound> = results.iter().map(|r| outbound("test", r)).collect();
    publisher.publish_all(outs).await.unwrap();
    results.into_iter().map(|r| r.ctx.unwrap().request_id).collect()
}

async fn results_round_trip(database_url: &str) {
    let nats = NatsServer::start().await.unwrap();
    let sink = Sink::start(&nats, database_url, &[]).await;
    let publisher = publisher(&nats).await;

    let ids = publish_results(&publisher, "rt", 120).await;
    // A second terminal outcome for a request (another stage's) is not stored: first wins.
    let late = result("rt-0", "u0", TerminalStatus::Cancelled);
    publisher.publish(outbound("late-stage", &late)).await.unwrap();
    // The same Nats-Msg-Id again is dropped by the stream itself.
    let dup = publisher.publish(outbound("test", &result("rt-1", "u1", TerminalStatus::Completed))).await.unwrap();
    assert!(dup.duplicate);
    sink.wait_rows(&ids, Duration::from_secs(30)).await;

    let (status, row) = sink.get("rt-0").await;
    assert_eq!(status, 200);
    assert_eq!(row["status"], "COMPLETED");
    assert_eq!(row["completion"], "answer for rt-0");
    assert_eq!(row["timings"][0]["stage"], "inference");
    assert_eq!(row["turns_dropped"], 3);
    assert_eq!((row["prompt_tokens"].as_u64(), row["prompt_tokens_cached"].as_u64()), (Some(11), Some(5)));
    let (status, err) = sink.get("nope").await;
    assert_eq!((status, err["error"]["code"].as_str()), (404, Some("not_found")));

    let all = sink.list_all("").await;
    assert_eq!(all.len(), 120, "one row per request");
    let distinct: HashSet<_> = all.iter().map(|r| r["request_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(distinct.len(), 120);
    let u3 = sink.list_all("user=u3").await;
    assert_eq!(u3.len(), 24);
    assert!(u3.iter().all(|r| r["user"] == "u3"));
    assert_eq!(sink.list_all("status=COMPLETED").await.len(), 120);
    assert_eq!(sink.list_all("status=FAILED").await.len(), 0);
    let bad = reqwest::get(format!("http://{}/v1/results?status=DONE", sink.http())).await.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    assert_eq!(bad.json::<Value>().await.unwrap()["error"]["code"], "bad_status");

    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", sink.grpc())).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    let serving = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(serving.status(), ServingStatus::Serving);
    let mut grpc = ResultsClient::connect(format!("http://{}", sink.grpc())).await.unwrap();
    let record = grpc.get(GetResultRequest { request_id: "rt-7".into() }).await.unwrap().into_inner();
    assert_eq!((record.status, record.user.as_str()), (TerminalStatus::Completed as i32, "u2"));
    assert_eq!((record.turns_dropped, record.prompt_tokens_cached), (3, 5));
    let missing = grpc.get(GetResultRequest { request_id: "nope".into() }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let mut seen = 0;
    let mut token = String::new();
    loop {
        let page = grpc
            .list(ListResultsRequest {
                user: "u1".into(),
                status: TerminalStatus::Completed as i32,
                page_size: 7,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        seen += page.results.len();
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, 24);
}

#[tokio::test]
async fn sqlite_stores_each_result_once_and_serves_it() {
    let dir = tempfile::tempdir().unwrap();
    results_round_trip(&format!("sqlite://{}/sink.db", dir.path().display())).await;
}

#[tokio::test]
async fn postgres_stores_each_result_once_and_serves_it() {
    let Some(url) = postgres_url("postgres_stores_each_result_once_and_serves_it") else { return };
    // A fresh database per run keeps reruns independent.
    let db = format!("millrace_test_{}", std::process::id());
    let admin = create_database(&url, &db).await;
    results_round_trip(&admin).await;
}

/// Creates database `db` on the server of `url` (with psql) and returns its URL.
async fn create_database(url: &str, db: &str) -> String {
    let out =
        std::process::Command::new("psql").arg(url).arg("-c").arg(format!("CREATE DATABASE {db}")).output().unwrap();
    assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{db}")
}

#[tokio::test]
async fn poison_result_becomes_a_dead_letter_and_a_failed_row_and_the_rest_still_arrive() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&nats, &format!("{}/sink.db", dir.path().display()), &[]).await;
    let publisher = publisher(&nats).await;
    // Straight onto the stream, as a foreign or broken producer would: the mesh's publisher
    // refuses to publish a terminal result it cannot read.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, Dedup::Stage("moderation").msg_id("poison-1").as_str());
    let poison = b"\xff\xff not protobuf".to_vec().into();
    let js = publisher.jetstream();
    js.publish_with_headers(Edge::RESULTS.subject_for("poison-1"), headers, poison).await.unwrap().await.unwrap();
    let refused = publisher
        .publish(Outbound {
            subject: Edge::RESULTS.subject_for("poison-2"),
            msg_id: Dedup::Outcome.msg_id("poison-2"),
            payload: b"\xff not protobuf either".to_vec().into(),
        })
        .await;
    assert!(refused.is_err(), "an undecodable terminal result is not published");
    let ids = publish_results(&publisher, "after-poison", 20).await;
    sink.wait_rows(&ids, Duration::from_secs(30)).await;
    sink.wait_rows(&["poison-1".to_owned()], Duration::from_secs(30)).await;
    let (_, row) = sink.get("poison-1").await;
    assert_eq!(row["status"], "FAILED");
    assert_eq!(row["reason"], "undecodable_payload");
    assert_eq!(row["stage"], "sink-results");
    let metrics = sink.process.metrics().await.unwrap();
    let dead = [("reason", "undecodable_payload"), ("stage", "sink-results")];
    assert_eq!(metric(&metrics, "millrace_dlq_total", &dead), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, "millrace_terms_total", &[("stage", "sink-results")]), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn a_sink_killed_before_commit_stores_the_row_exactly_once_after_restart() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("{}/sink.db", dir.path().display());
    let mut sink = Sink::start(&nats, &db, &["--fault-abort-before-commit"]).await;
    let publisher = publisher(&nats).await;
    let ids = publish_results(&publisher, "crash", 30).await;
    // The sink received the batch and died before committing it.
    let status = sink.process.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(!status.success());
    sink.restart().await;
    sink.wait_rows(&ids, Duration::from_secs(30)).await;
    let all = sink.list_all("").await;
    assert_eq!(all.len(), 30);
}

#[tokio::test]
async fn a_panicking_worker_is_restarted_and_no_message_is_lost() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(
        &nats,
        &format!("{}/sink.db", dir.path().display()),
        &["--fault-panic-every=25", "--max-restarts=100", "--restart-backoff-ms=10"],
    )
    .await;
    let publisher = publisher(&nats).await;
    let ids = publish_results(&publisher, "panic", 200).await;
    sink.wait_rows(&ids, Duration::from_secs(60)).await;
    assert_eq!(sink.list_all("").await.len(), 200);
    let logs = sink.process.logs();
    assert!(logs.contains("injected fault"), "no fault was injected:\n{logs}");
    assert!(logs.contains("restarting"), "no restart:\n{logs}");
    let health = reqwest::get(format!("http://{}/readyz", sink.process.admin())).await.unwrap();
    assert_eq!(health.status().as_u16(), 200, "the process stayed up and is ready again");
}

#[tokio::test]
async fn exceeding_the_restart_intensity_exits_non_zero() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut sink = Sink::start(
        &nats,
        &format!("{}/sink.db", dir.path().display()),
        &["--fault-panic-every=1", "--max-restarts=2", "--restart-backoff-ms=10"],
    )
    .await;
    let publisher = publisher(&nats).await;
    // Every first delivery panics: each new message costs the consumer a restart.
    for i in 0..100 {
        publish_results(&publisher, &format!("boom{i}"), 1).await;
        if sink.process.wait_exit(Duration::from_millis(200)).await.is_ok() {
            break;
        }
    }
    let status = sink.process.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(sink.process.logs().contains("restart intensity exceeded"));
}

#[tokio::test]
async fn sigterm_under_load_drains_exits_zero_and_loses_nothing() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut sink = Sink::start(&nats, &format!("{}/sink.db", dir.path().display()), &[]).await;
    let publisher = publisher(&nats).await;
    let load = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..20 {
                ids.extend(publish_results(&publisher, &format!("load{round}"), 100).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let status = sink.process.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "drain exit: {status:?}\n{}", sink.process.logs());
    let ids = load.await.unwrap();
    sink.restart().await;
    sink.wait_rows(&ids, Duration::from_secs(60)).await;
    assert_eq!(sink.list_all("").await.len(), ids.len());
}
