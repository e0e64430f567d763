//! The ingest service's configuration: every flag also reads its `MILLRACE_…` env var.
use std::net::SocketAddr;

use millrace_runtime::ShellArgs;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ingest", about = "Millrace ingest: the HTTP and gRPC front door publishing to QUERIES")]
pub struct IngestConfig {
    /// HTTP API (`/v1/queries`).
    #[arg(long, env = "MILLRACE_INGEST_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// gRPC `millrace.v1.Ingest` and health.
    #[arg(long, env = "MILLRACE_INGEST_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Base URL of the sink's results API, asked by `GET /v1/queries/{id}`.
    #[arg(long, env = "MILLRACE_SINK_URL", default_value = "http://127.0.0.1:8090")]
    pub sink_url: String,
    /// gRPC address of moderation, whose `Check` releases streamed text to clients; empty =
    /// stream nothing before a request's end.
    #[arg(long, env = "MILLRACE_MODERATION_URL", default_value = "http://127.0.0.1:50053")]
    pub moderation_url: String,
    /// gRPC address of inference, whose `Embed` answers `POST /v1/embeddings`; empty = that
    /// endpoint answers 503.
    #[arg(long, env = "MILLRACE_INFERENCE_URL", default_value = "http://127.0.0.1:50055")]
    pub inference_url: String,
    /// File of API keys, one `<sha256 hex of the key> <tenant>` per line (see `auth`); with
    /// keys configured every API asks for `Authorization: Bearer <key>`.
    #[arg(long, env = "MILLRACE_API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// API keys given inline, `<sha256 hex> <tenant>` entries separated by commas.
    #[arg(long, env = "MILLRACE_API_KEYS", default_value = "", hide_env_values = true)]
    pub api_keys: String,
    /// Unfinished requests one WebSocket may have; more are refused with `too_many_in_flight`.
    #[arg(long, env = "MILLRACE_INGEST_WS_MAX_IN_FLIGHT", default_value_t = 256)]
    pub ws_max_in_flight: usize,
    /// Largest request body (or WebSocket frame) accepted, bytes; larger bodies get 413 without being read whole.
    #[arg(long, env = "MILLRACE_INGEST_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    #[command(flatten)]
    pub policy: SubmitPolicy,
    #[command(flatten)]
    pub shell: ShellArgs,
}

impl IngestConfig {
    pub const ADMIN_PORT: u16 = 9180;
}

/// What a submit may ask for; both APIs validate against the same policy.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitPolicy {
    /// Models clients may name (comma-separated); the first is the default.
    #[arg(long, env = "MILLRACE_INGEST_ALLOWED_MODELS", value_delimiter = ',', num_args = 1.., default_value = "smollm2-135m")]
    pub allowed_models: Vec<String>,
    /// Longest query text, in characters (Unicode scalar values).
    #[arg(long, env = "MILLRACE_INGEST_MAX_TEXT_CHARS", default_value_t = 8000)]
    pub max_text_chars: usize,
    /// Largest `max_new_tokens` a client may ask for.
    #[arg(long, env = "MILLRACE_INGEST_MAX_NEW_TOKENS", default_value_t = 4096)]
    pub max_new_tokens: u32,
    /// Deadline of a request that names none, milliseconds from acceptance.
    #[arg(long, env = "MILLRACE_INGEST_DEFAULT_DEADLINE_MS", default_value_t = 30_000)]
    pub default_deadline_ms: u32,
    /// Longest deadline a client may ask for, milliseconds.
    #[arg(long, env = "MILLRACE_INGEST_MAX_DEADLINE_MS", default_value_t = 600_000)]
    pub max_deadline_ms: u32,
    /// Tenant of a request that names none (no `X-Tenant` header, empty gRPC `tenant`).
    #[arg(long, env = "MILLRACE_INGEST_DEFAULT_TENANT", default_value = "default")]
    pub default_tenant: String,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_and_model_list() {
        let c = IngestConfig::parse_from(["ingest"]);
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.max_body_bytes, 65_536);
        assert_eq!(c.policy.allowed_models, ["smollm2-135m"]);
        assert_eq!(c.policy.default_tenant, "default");
        let c = IngestConfig::parse_from(["ingest", "--allowed-models=a,b"]);
        assert_eq!(c.policy.allowed_models, ["a", "b"]);
    }
}
