//! The sink's configuration: every flag also reads its `MILLRACE_…` env var.
use std::net::SocketAddr;
use std::time::Duration;

use millrace_runtime::ShellArgs;

use crate::writer::BatchPolicy;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "sink", about = "Millrace sink: RESULTS and DLQ into SQL, and the results API")]
pub struct SinkConfig {
    /// `postgres://…` for PostgreSQL; `sqlite://path` or a plain path for SQLite.
    #[arg(long, env = "MILLRACE_DATABASE_URL", default_value = "sqlite://data/sink.db")]
    pub database_url: String,
    /// HTTP results API.
    #[arg(long, env = "MILLRACE_SINK_HTTP_ADDR", default_value = "127.0.0.1:8090")]
    pub http_addr: SocketAddr,
    /// gRPC `millrace.v1.Results` and health.
    #[arg(long, env = "MILLRACE_SINK_GRPC_ADDR", default_value = "127.0.0.1:50057")]
    pub grpc_addr: SocketAddr,
    /// Rows per transaction at most.
    #[arg(long, env = "MILLRACE_SINK_BATCH_ROWS", default_value_t = 256)]
    pub batch_rows: usize,
    /// How long a transaction waits for more rows once it has one, milliseconds.
    #[arg(long, env = "MILLRACE_SINK_BATCH_LINGER_MS", default_value_t = 2)]
    pub batch_linger_ms: u64,
    /// Test fault: abort right before the first commit.
    #[arg(long, env = "MILLRACE_FAULT_ABORT_BEFORE_COMMIT", hide = true)]
    pub fault_abort_before_commit: bool,
    #[command(flatten)]
    pub shell: ShellArgs,
}

impl SinkConfig {
    pub const ADMIN_PORT: u16 = 9187;

    pub fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy {
            max_rows: self.batch_rows.max(1),
            linger: Duration::from_millis(self.batch_linger_ms),
            abort_before_commit: self.fault_abort_before_commit,
        }
    }
}
