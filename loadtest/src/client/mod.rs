//! The three ways into the mesh. Each sends one [`Query`], reports acceptance and tokens on its
//! [`Trace`] as they come, and returns how the request ended ([`Ending`]).
mod grpc;
mod http;
mod ws;

use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::record::{Ending, Event, Told};
use crate::workload::Query;

/// Which API of ingest carries the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// OpenAI-compatible streaming chat, `POST /v1/chat/completions` (SSE).
    Http,
    /// `GET /v1/ws`: several queries multiplexed on each socket.
    Ws,
    /// `millrace.v1.Ingest/Generate`, a server stream per request.
    Grpc,
}

/// Where ingest listens and how many connections to hold.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub api: Api,
    /// Base URL of ingest's HTTP API (`http://host:port`).
    pub ingest_url: String,
    /// URL of ingest's gRPC API.
    pub grpc_url: String,
    /// Sent as `Authorization: Bearer <key>` by every client.
    pub api_key: Option<String>,
    /// WebSocket connections (ws) or HTTP/2 channels (grpc); requests are spread over them.
    pub connections: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP: {}", chain(.0))]
    Http(#[from] reqwest::Error),
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("gRPC transport: {}", chain(.0))]
    GrpcTransport(#[from] tonic::transport::Error),
    #[error("gRPC stream: {0}")]
    GrpcStatus(#[from] tonic::Status),
    #[error("malformed server message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("protocol: {0}")]
    Protocol(&'static str),
    #[error("the API key is not a valid header value")]
    ApiKey,
}

/// The `Authorization` header value for `api_key`.
fn bearer(api_key: &str) -> Result<reqwest::header::HeaderValue, ClientError> {
    let mut value =
        reqwest::header::HeaderValue::try_from(format!("Bearer {api_key}")).map_err(|_| ClientError::ApiKey)?;
    value.set_sensitive(true);
    Ok(value)
}

/// An error with its sources: reqwest and hyper put the useful part ("connection refused")
/// in the source, not in the top-level message.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// What is known about one request while it runs. Filled in place, so what was learned
/// survives when the harness gives up on the request and drops its future.
pub struct Trace {
    /// Start of the phase: every time here is an offset from it.
    origin: Instant,
    events: UnboundedSender<Event>,
    pub request_id: Option<String>,
    pub first_token_at: Option<Duration>,
}

impl Trace {
    pub fn new(origin: Instant, events: UnboundedSender<Event>) -> Self {
        Self { origin, events, request_id: None, first_token_at: None }
    }

    /// Now, on the phase clock.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    pub fn accepted(&mut self, request_id: String) {
        self.request_id = Some(request_id);
        // The phase loop may already be gone when a straggler is accepted; nothing to tell then.
        let _ = self.events.send(Event::Accepted { at: self.now() });
    }

    /// A piece of generated text arrived; the first non-empty one marks time to first token.
    pub fn token(&mut self, text: &str) {
        if self.first_token_at.is_none() && !text.is_empty() {
            self.first_token_at = Some(self.now());
        }
    }

    pub fn terminal(&self, told: Told) -> Ending {
        Ending::Terminal { told, at: self.now() }
    }
}

/// A connected client for one phase.
pub enum Client {
    Http(http::HttpClient),
    Ws(ws::WsClient),
    Grpc(grpc::GrpcClient),
}

impl Client {
    pub async fn connect(endpoints: &Endpoints) -> Result<Self, ClientError> {
        let connections = endpoints.connections.max(1);
        Ok(match endpoints.api {
            Api::Http => Self::Http(http::HttpClient::new(&endpoints.ingest_url, endpoints.api_key.as_deref())?),
            Api::Ws => {
                Self::Ws(ws::WsClient::connect(&endpoints.ingest_url, endpoints.api_key.as_deref(), connections).await?)
            }
            Api::Grpc => Self::Grpc(
                grpc::GrpcClient::connect(&endpoints.grpc_url, endpoints.api_key.as_deref(), connections).await?,
            ),
        })
    }

    /// Sends `query` and follows it to its end.
    pub async fn execute(&self, query: &Query, trace: &mut Trace) -> Result<Ending, ClientError> {
        match self {
            Self::Http(client) => client.execute(query, trace).await,
            Self::Ws(client) => client.execute(query, trace).await,
            Self::Grpc(client) => client.execute(query, trace).await,
        }
    }

    /// Closes the connections; the mesh cancels whatever is still open on them.
    pub async fn close(&self) {
        if let Self::Ws(client) = self {
            client.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_non_empty_token_marks_ttft() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut trace = Trace::new(Instant::now(), tx);
        trace.token("");
        assert_eq!(trace.first_token_at, None);
        trace.token("Hi");
        let first = trace.first_token_at.expect("set by the first text");
        trace.token(" there");
        assert_eq!(trace.first_token_at, Some(first));
        trace.accepted("r1".into());
        assert_eq!(trace.request_id.as_deref(), Some("r1"));
        assert!(matches!(rx.try_recv(), Ok(Event::Accepted { .. })));
    }
}
