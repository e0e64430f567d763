//! `GET /v1/ws`: JSON text frames, several queries in flight per socket. Each socket has a
//! writer task (frames out) and a reader task that routes frames to the request they belong
//! to: by the client's `ref` until `accepted` names the request id, by request id after.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;

use super::{ClientError, Trace, bearer};
use millrace_proto::v1::TerminalStatus;

use crate::record::{Ending, Told};
use crate::workload::Query;

/// How long closing waits for the server to answer the close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct WsClient {
    sockets: Vec<Socket>,
}

struct Socket {
    outgoing: UnboundedSender<Message>,
    routes: Arc<Mutex<Routes>>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

/// Where the frames of each open request go.
#[derive(Default)]
struct Routes {
    by_ref: HashMap<String, UnboundedSender<ServerFrame>>,
    by_request_id: HashMap<String, UnboundedSender<ServerFrame>>,
    /// The socket is gone: no frame will come, so no request may wait for one.
    closed: bool,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerFrame {
    Accepted {
        #[serde(rename = "ref")]
        reference: String,
        request_id: String,
    },
    Token {
        request_id: String,
        text: String,
    },
    Result {
        request_id: String,
        result: ResultStatus,
    },
    Error {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        error: FrameError,
    },
}

/// The part of the result row the client needs; the sink is read for the rest.
#[derive(Debug, Deserialize, PartialEq)]
struct ResultStatus {
    #[serde(with = "millrace_proto::row::status_name")]
    status: TerminalStatus,
}

#[derive(Debug, Deserialize, PartialEq)]
struct FrameError {
    code: String,
}

impl WsClient {
    pub async fn connect(ingest_url: &str, api_key: Option<&str>, sockets: usize) -> Result<Self, ClientError> {
        let url = ws_url(ingest_url);
        let authorization = api_key.map(bearer).transpose()?;
        let mut connected = Vec::with_capacity(sockets);
        for _ in 0..sockets {
            connected.push(Socket::connect(&url, authorization.as_ref()).await?);
        }
        Ok(Self { sockets: connected })
    }

    pub async fn execute(&self, query: &Query, trace: &mut Trace) -> Result<Ending, ClientError> {
        let socket = &self.sockets[query.seq as usize % self.sockets.len()];
        let reference = query.seq.to_string();
        let (frames_tx, mut frames) = mpsc::unbounded_channel();
        {
            let mut routes = socket.routes.lock().expect("routes lock");
            if routes.closed {
                return Err(ClientError::Protocol("the socket is closed"));
            }
            routes.by_ref.insert(reference.clone(), frames_tx);
        }
        let mut route = RouteGuard { routes: socket.routes.clone(), reference, request_id: None };

        let mut body = json!({
            "text": query.text,
            "user": query.user,
            "session": query.session,
            "model": query.model,
            "params": { "max_new_tokens": query.max_new_tokens, "ignore_eos": query.ignore_eos },
        });
        if let Some(deadline_ms) = query.deadline_ms {
            body["deadline_ms"] = deadline_ms.into();
        }
        let frame = json!({ "type": "query", "ref": route.reference, "query": body });
        socket
            .outgoing
            .send(Message::text(frame.to_string()))
            .map_err(|_| ClientError::Protocol("the socket is closed"))?;
        follow(&mut frames, &mut route, trace).await
    }

    pub async fn close(&self) {
        for socket in &self.sockets {
            let _ = socket.outgoing.send(Message::Close(None));
            let reader = socket.reader.lock().expect("reader lock").take();
            if let Some(mut reader) = reader
                && tokio::time::timeout(CLOSE_TIMEOUT, &mut reader).await.is_err()
            {
                reader.abort();
            }
        }
    }
}

/// Reads one request's frames until its result (or refusal).
async fn follow(
    frames: &mut UnboundedReceiver<ServerFrame>,
    route: &mut RouteGuard,
    trace: &mut Trace,
) -> Result<Ending, ClientError> {
    while let Some(frame) = frames.recv().await {
        match frame {
            ServerFrame::Accepted { request_id, .. } => {
                route.request_id = Some(request_id.clone());
                trace.accepted(request_id);
            }
            ServerFrame::Token { text, .. } => trace.token(&text),
            ServerFrame::Result { result, .. } => return Ok(trace.terminal(Told::Status(result.status))),
            ServerFrame::Error { error, .. } => return Ok(Ending::Rejected { code: error.code }),
        }
    }
    Err(ClientError::Protocol("the socket closed before the result"))
}

/// `http://host:port` → `ws://host:port/v1/ws` (and https → wss).
fn ws_url(ingest_url: &str) -> String {
    let base = ingest_url.trim_end_matches('/');
    let base = match base.split_once("://") {
        Some(("https", rest)) => format!("wss://{rest}"),
        Some(("http", rest)) => format!("ws://{rest}"),
        Some(_) => base.to_owned(),
        None => format!("ws://{base}"),
    };
    format!("{base}/v1/ws")
}

impl Socket {
    async fn connect(url: &str, authorization: Option<&HeaderValue>) -> Result<Self, ClientError> {
        let mut request = url.into_client_request()?;
        if let Some(value) = authorization {
            request.headers_mut().insert(AUTHORIZATION, value.clone());
        }
        let (stream, _) = tokio_tungstenite::connect_async(request).await?;
        let (mut sink, mut incoming) = stream.split();
        let (outgoing, mut to_send) = mpsc::unbounded_channel::<Message>();
        let routes = Arc::new(Mutex::new(Routes::default()));

        tokio::spawn(async move {
            while let Some(message) = to_send.recv().await {
                let closing = matches!(message, Message::Close(_));
                if sink.send(message).await.is_err() || closing {
                    break;
                }
            }
        });
        let reader_routes = routes.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(message)) = incoming.next().await {
                match message {
                    // A frame this client does not understand belongs to no request it can end.
                    Message::Text(text) => match serde_json::from_str::<ServerFrame>(text.as_str()) {
                        Ok(frame) => reader_routes.lock().expect("routes lock").route(frame),
                        Err(_) => continue,
                    },
                    Message::Close(_) => break,
                    _ => continue,
                }
            }
            // Dropping every route ends each open request with "socket closed".
            *reader_routes.lock().expect("routes lock") = Routes { closed: true, ..Routes::default() };
        });
        Ok(Self { outgoing, routes, reader: Mutex::new(Some(reader)) })
    }
}

impl Routes {
    fn route(&mut self, frame: ServerFrame) {
        let target = match &frame {
            ServerFrame::Accepted { reference, request_id } => self.by_ref.remove(reference).inspect(|tx| {
                self.by_request_id.insert(request_id.clone(), tx.clone());
            }),
            ServerFrame::Token { request_id, .. } => self.by_request_id.get(request_id).cloned(),
            ServerFrame::Result { request_id, .. } => self.by_request_id.remove(request_id),
            ServerFrame::Error { reference: Some(reference), .. } => self.by_ref.remove(reference),
            ServerFrame::Error { reference: None, .. } => None,
        };
        if let Some(tx) = target {
            // The request may have been given up on; its frames have nowhere to go then.
            let _ = tx.send(frame);
        }
    }
}

/// Removes a request's routes when it ends or is given up on.
struct RouteGuard {
    routes: Arc<Mutex<Routes>>,
    reference: String,
    request_id: Option<String>,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        let mut routes = self.routes.lock().expect("routes lock");
        routes.by_ref.remove(&self.reference);
        if let Some(id) = &self.request_id {
            routes.by_request_id.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(json: &str) -> ServerFrame {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn server_frames_parse() {
        assert_eq!(
            frame(r#"{"type":"accepted","ref":"c1","request_id":"r1","created":true}"#),
            ServerFrame::Accepted { reference: "c1".into(), request_id: "r1".into() }
        );
        assert_eq!(
            frame(r#"{"type":"token","request_id":"r1","index":0,"text":"Hi"}"#),
            ServerFrame::Token { request_id: "r1".into(), text: "Hi".into() }
        );
        assert_eq!(
            frame(
                r#"{"type":"result","request_id":"r1","result":{"request_id":"r1","status":"COMPLETED","timings":[]}}"#
            ),
            ServerFrame::Result { request_id: "r1".into(), result: ResultStatus { status: TerminalStatus::Completed } }
        );
        assert_eq!(
            frame(r#"{"type":"error","ref":"c2","error":{"code":"empty_text","message":"m"}}"#),
            ServerFrame::Error { reference: Some("c2".into()), error: FrameError { code: "empty_text".into() } }
        );
    }

    #[test]
    fn frames_follow_the_ref_then_the_request_id() {
        let mut routes = Routes::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        routes.by_ref.insert("7".into(), tx);
        routes.route(frame(r#"{"type":"token","request_id":"r7","index":0,"text":"early"}"#));
        routes.route(frame(r#"{"type":"accepted","ref":"7","request_id":"r7","created":true}"#));
        routes.route(frame(r#"{"type":"token","request_id":"r7","index":0,"text":"Hi"}"#));
        routes.route(frame(r#"{"type":"result","request_id":"r7","result":{"status":"COMPLETED"}}"#));
        assert!(matches!(rx.try_recv(), Ok(ServerFrame::Accepted { .. })));
        assert!(matches!(rx.try_recv(), Ok(ServerFrame::Token { text, .. }) if text == "Hi"));
        assert!(matches!(rx.try_recv(), Ok(ServerFrame::Result { .. })));
        assert!(routes.by_ref.is_empty() && routes.by_request_id.is_empty());
        let (tx, mut rx) = mpsc::unbounded_channel();
        routes.by_ref.insert("8".into(), tx);
        routes.route(frame(r#"{"type":"error","ref":"8","error":{"code":"bad_model","message":"m"}}"#));
        assert!(matches!(rx.try_recv(), Ok(ServerFrame::Error { .. })) && routes.by_ref.is_empty());
    }

    #[test]
    fn the_socket_url_comes_from_the_http_base() {
        assert_eq!(ws_url("http://127.0.0.1:8080/"), "ws://127.0.0.1:8080/v1/ws");
        assert_eq!(ws_url("https://mesh.example"), "wss://mesh.example/v1/ws");
        assert_eq!(ws_url("localhost:8080"), "ws://localhost:8080/v1/ws");
    }
}
