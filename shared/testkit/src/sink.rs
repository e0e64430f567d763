//! The sink binary storing terminal rows in SQLite, for the tests that read what a request came
//! to through the sink's results API (`GET /v1/results/{id}`), as a client of the mesh does.
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{NatsServer, ServiceProcess};

/// How long the sink may take to become ready.
const READY: Duration = Duration::from_secs(60);
/// How long a request's row may take (a debug build working through a burst on two cores).
pub const ROW_WAIT: Duration = Duration::from_secs(180);
/// The sink's flags that take a listen address.
const LISTEN: [&str; 2] = ["--http-addr", "--grpc-addr"];

/// Starts the sink on `nats`, storing into `data/sink.db`, with `extra` flags.
pub async fn start_sink(nats: &NatsServer, data: &Path, extra: &[String]) -> anyhow::Result<ServiceProcess> {
    let mut args =
        vec![format!("--nats-url={}", nats.url()), format!("--database-url=sqlite://{}/sink.db", data.display())];
    args.extend_from_slice(extra);
    ServiceProcess::start("sink", &args, &LISTEN, READY).await
}

/// The sink's row of `request_id` from the sink's HTTP API at `http`, once stored (a stage
/// publishes the terminal result; the sink stores it a moment later), waiting up to `timeout`.
pub async fn wait_row(http: SocketAddr, request_id: &str, timeout: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let response = reqwest::get(format!("http://{http}/v1/results/{request_id}")).await?;
        if response.status() == reqwest::StatusCode::OK {
            return Ok(response.json().await?);
        }
        anyhow::ensure!(Instant::now() < deadline, "no row for {request_id} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sink with a database of its own in a temp folder.
pub struct Sink {
    pub process: ServiceProcess,
    _data: tempfile::TempDir,
}

impl Sink {
    pub async fn start(nats: &NatsServer) -> anyhow::Result<Sink> {
        let data = tempfile::tempdir()?;
        let process = start_sink(nats, data.path(), &[]).await?;
        Ok(Sink { process, _data: data })
    }

    /// The results API.
    pub fn http(&self) -> SocketAddr {
        self.process.addr("--http-addr")
    }

    /// The row of `request_id`, waiting up to [`ROW_WAIT`] for it; panics without one.
    pub async fn row(&self, request_id: &str) -> Value {
        wait_row(self.http(), request_id, ROW_WAIT).await.unwrap_or_else(|e| panic!("sink: {e:#}"))
    }
}
