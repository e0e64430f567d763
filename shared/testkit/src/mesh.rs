//! The whole mesh for end-to-end tests: a real `nats-server -js` and the seven service binaries,
//! one process each as deployed, on free ports, with a SQLite sink in a temp folder and the
//! prepared models (`scripts/prepare-models.sh`).
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::{NatsServer, ServiceProcess, free_addr, workspace_root};

/// How long a service may take to become ready (loading models included).
const READY: Duration = Duration::from_secs(120);
/// How long a request's row may take (a debug build working through a burst on two cores).
const ROW_WAIT: Duration = Duration::from_secs(180);

/// What differs between meshes; every other flag is the service's default.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// The model inference serves, also the only one ingest allows.
    pub model: String,
    /// Extra flags per service (`("moderation", "--policy=…")`).
    pub extra_args: Vec<(&'static str, String)>,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self { model: "smollm2-135m".into(), extra_args: Vec::new() }
    }
}

/// NATS and the seven services. Services are declared first so they stop before NATS.
pub struct Mesh {
    pub services: Vec<ServiceProcess>,
    _data: tempfile::TempDir,
    pub nats: NatsServer,
    /// Ingest's HTTP API (`/v1/queries`, `/v1/chat/completions`, `/v1/ws`).
    pub ingest_http: SocketAddr,
    pub ingest_grpc: SocketAddr,
    /// The sink's results API.
    pub sink_http: SocketAddr,
    /// Session's gRPC `Sessions` API.
    pub session_grpc: SocketAddr,
}

impl Mesh {
    pub async fn start(options: MeshOptions) -> anyhow::Result<Mesh> {
        let nats = NatsServer::start().await?;
        let data = tempfile::tempdir()?;
        let models = format!("--models-dir={}", workspace_root().join("models/prepared").display());
        let (ingest_http, ingest_grpc, sink_http) = (free_addr(), free_addr(), free_addr());
        let (moderation_grpc, session_grpc) = (free_addr(), free_addr());
        let grpc = || format!("--grpc-addr={}", free_addr());
        let specs: Vec<(&str, Vec<String>)> = vec![
            (
                "sink",
                vec![
                    format!("--http-addr={sink_http}"),
                    grpc(),
                    format!("--database-url=sqlite://{}/sink.db", data.path().display()),
                ],
            ),
            ("inference", vec![models.clone(), grpc(), format!("--model={}", options.model)]),
            ("batcher", vec![]),
            ("session", vec![models.clone(), format!("--grpc-addr={session_grpc}")]),
            ("moderation", vec![models.clone(), format!("--grpc-addr={moderation_grpc}")]),
            ("preprocess", vec![models.clone()]),
            (
                "ingest",
                vec![
                    format!("--http-addr={ingest_http}"),
                    format!("--grpc-addr={ingest_grpc}"),
                    format!("--sink-url=http://{sink_http}"),
                    format!("--moderation-url=http://{moderation_grpc}"),
                    format!("--allowed-models={}", options.model),
                ],
            ),
        ];
        let mut services = Vec::new();
        for (name, mut args) in specs {
            args.push(format!("--nats-url={}", nats.url()));
            args.push("--stream-storage=memory".to_owned());
            args.extend(options.extra_args.iter().filter(|(service, _)| *service == name).map(|(_, arg)| arg.clone()));
            services.push(ServiceProcess::spawn(name, &args)?);
        }
        for service in &services {
            service.wait_ready(READY).await?;
        }
        Ok(Mesh { services, _data: data, nats, ingest_http, ingest_grpc, sink_http, session_grpc })
    }

    /// An ingest HTTP URL (`path` starts with `/`).
    pub fn ingest_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingest_http)
    }

    /// A sink HTTP URL (`path` starts with `/`).
    pub fn sink_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sink_http)
    }

    /// The sink's row for a request, once stored (a stream ends when the result is published;
    /// the sink stores it a moment later).
    pub async fn stored_row(&self, request_id: &str) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + ROW_WAIT;
        loop {
            let response = reqwest::get(self.sink_url(&format!("/v1/results/{request_id}"))).await?;
            if response.status() == reqwest::StatusCode::OK {
                return Ok(response.json().await?);
            }
            anyhow::ensure!(Instant::now() < deadline, "no row for {request_id} within {ROW_WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A service's Prometheus metrics text.
    pub async fn metrics(&self, service: &str) -> anyhow::Result<String> {
        let process =
            self.services.iter().find(|s| s.name() == service).ok_or_else(|| anyhow::anyhow!("no {service}"))?;
        Ok(reqwest::get(format!("http://{}/metrics", process.admin)).await?.text().await?)
    }

    /// Every service's log, for a failure message.
    pub fn logs(&self) -> String {
        self.services.iter().map(|s| format!("--- {} ---\n{}", s.name(), s.logs())).collect::<Vec<_>>().join("\n")
    }
}

/// The value of an unlabelled Prometheus counter or gauge in a metrics text, 0 if absent.
pub fn metric_value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .filter_map(|value| value.trim().parse().ok())
        .next()
        .unwrap_or(0.0)
}
