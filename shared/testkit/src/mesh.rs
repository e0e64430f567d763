//! The whole mesh for end-to-end tests: a real `nats-server -js` and the seven service binaries,
//! one process each as deployed, with a SQLite sink in a temp folder and the prepared models
//! (`scripts/prepare-models.sh`).
use std::net::SocketAddr;
use std::time::Duration;

use crate::sink::{ROW_WAIT, start_sink, wait_row};
use crate::{NatsServer, ServiceProcess, models_dir};

/// How long a service may take to become ready (loading models included).
const READY: Duration = Duration::from_secs(120);

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
    /// Starts NATS, then every service but ingest side by side, then ingest, which is told
    /// where the sink and moderation listen.
    pub async fn start(options: MeshOptions) -> anyhow::Result<Mesh> {
        let nats = NatsServer::start().await?;
        let data = tempfile::tempdir()?;
        // What every service gets besides its own flags: in-memory streams and the test's extras.
        let extra = |name: &str| -> Vec<String> {
            let mut args = vec!["--stream-storage=memory".to_owned()];
            args.extend(options.extra_args.iter().filter(|(service, _)| *service == name).map(|(_, arg)| arg.clone()));
            args
        };
        let service = |name: &'static str, mut args: Vec<String>, listen: &'static [&'static str]| {
            args.push(format!("--nats-url={}", nats.url()));
            args.extend(extra(name));
            async move { ServiceProcess::start(name, &args, listen, READY).await }
        };
        let models = format!("--models-dir={}", models_dir().display());
        let sink_extra = extra("sink");
        let (sink, inference, batcher, session, moderation, preprocess) = tokio::try_join!(
            start_sink(&nats, data.path(), &sink_extra),
            service("inference", vec![models.clone(), format!("--model={}", options.model)], &["--grpc-addr"]),
            service("batcher", vec![], &[]),
            service("session", vec![models.clone()], &["--grpc-addr"]),
            service("moderation", vec![models.clone()], &["--grpc-addr"]),
            service("preprocess", vec![models.clone()], &[]),
        )?;
        let ingest_args = vec![
            format!("--sink-url=http://{}", sink.addr("--http-addr")),
            format!("--moderation-url=http://{}", moderation.addr("--grpc-addr")),
            format!("--inference-url=http://{}", inference.addr("--grpc-addr")),
            format!("--allowed-models={}", options.model),
        ];
        let ingest = service("ingest", ingest_args, &["--http-addr", "--grpc-addr"]).await?;
        Ok(Mesh {
            ingest_http: ingest.addr("--http-addr"),
            ingest_grpc: ingest.addr("--grpc-addr"),
            sink_http: sink.addr("--http-addr"),
            session_grpc: session.addr("--grpc-addr"),
            services: vec![sink, inference, batcher, session, moderation, preprocess, ingest],
            _data: data,
            nats,
        })
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
        wait_row(self.sink_http, request_id, ROW_WAIT).await
    }

    /// A service's Prometheus metrics text.
    pub async fn metrics(&self, service: &str) -> anyhow::Result<String> {
        let process =
            self.services.iter().find(|s| s.name() == service).ok_or_else(|| anyhow::anyhow!("no {service}"))?;
        process.metrics().await
    }

    /// Every service's log, for a failure message.
    pub fn logs(&self) -> String {
        self.services.iter().map(|s| format!("--- {} ---\n{}", s.name(), s.logs())).collect::<Vec<_>>().join("\n")
    }
}
