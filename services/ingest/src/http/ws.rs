//! WebSocket `/v1/ws`: several queries on one socket, each followed to its end.
//!
//! JSON text frames. From the client:
//! - `{"type": "query", "ref": "c1", "query": {…}, "idempotency_key": "k"}`: `query` is exactly
//!   the body of `POST /v1/queries`; `ref` (any string, optional) is echoed so the client can
//!   match the answer; `idempotency_key` is optional. The tenant is the upgrade request's
//!   `X-Tenant` header.
//! - `{"type": "cancel", "request_id": "…"}`: cancels one of this socket's unfinished requests
//!   (its `result` frame follows, CANCELLED unless it had just ended otherwise).
//!
//! To the client:
//! - `{"type": "accepted", "ref", "request_id", "created"}` once the query is on the stream;
//! - `{"type": "token", "request_id", "index", "text"}`: moderated text as it is released
//!   (index 0, 1, … per request);
//! - `{"type": "result", "request_id", "result": {…}}`: the terminal outcome, shaped as
//!   `GET /v1/queries/{id}` answers it; the last frame of that request;
//! - `{"type": "error", "ref", "request_id", "error": {"code", "message"}}`: a refused query
//!   or frame (the codes of `POST /v1/queries`, plus `bad_frame`, `unknown_request` and
//!   `too_many_in_flight`), or a request that passed its deadline (`timeout`).
//!
//! Closing the socket cancels every request of it that has not ended: each request is followed
//! by its own task owning a [`Follower`], and dropping a follower before the end cancels.
use std::collections::HashMap;

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, Session};
use futures::StreamExt;
use futures::channel::mpsc;
use millrace_proto::now_unix_us;
use millrace_proto::v1::RequestContext;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tracing::debug;

use super::request::{HttpApi, tenant};
use crate::error::ApiError;
use crate::follow::{Event, Follower, Frontend};
use crate::json::submission_from_json;
use crate::submit::{Submission, SubmitError};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/ws", web::get().to(upgrade));
}

async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    api: web::Data<HttpApi>,
) -> Result<HttpResponse, actix_web::Error> {
    let tenant = tenant(&req).map_err(ApiError::from)?;
    let (response, session, messages) = actix_ws::handle(&req, body)?;
    let messages = messages.max_frame_size(api.max_body_bytes).aggregate_continuations();
    let socket = Socket {
        frontend: api.frontend.clone(),
        tenant,
        max_in_flight: api.ws_max_in_flight,
        session,
        running: HashMap::new(),
    };
    actix_web::rt::spawn(socket.run(messages));
    Ok(response)
}

/// What a request's task tells the socket.
enum Outgoing {
    Frame(Value),
    /// The request ended (its last frame was sent before this).
    Ended(String),
}

struct Socket {
    frontend: Frontend,
    tenant: Option<String>,
    max_in_flight: usize,
    session: Session,
    /// The unfinished requests: their tasks (aborting one drops its follower, which cancels the
    /// request) and contexts.
    running: HashMap<String, (JoinHandle<()>, RequestContext)>,
}

impl Socket {
    async fn run(mut self, mut messages: actix_ws::AggregatedMessageStream) {
        let (tx, mut rx) = mpsc::unbounded::<Outgoing>();
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        if let Some(frame) = self.on_frame(&text, &tx).await && self.send(frame).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(AggregatedMessage::Binary(_))) => {
                        let frame = error_frame(None, None, "bad_frame", "frames are JSON text".to_owned());
                        if self.send(frame).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        if self.session.pong(&bytes).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => {}
                    Some(Ok(AggregatedMessage::Close(reason))) => {
                        let _ = self.session.clone().close(reason).await;
                        break;
                    }
                    // A protocol error or the connection's end.
                    Some(Err(_)) | None => break,
                },
                Some(outgoing) = rx.next() => match outgoing {
                    Outgoing::Frame(frame) => {
                        if self.send(frame).await.is_err() {
                            break;
                        }
                    }
                    Outgoing::Ended(request_id) => {
                        self.running.remove(&request_id);
                    }
                },
            }
        }
        if !self.running.is_empty() {
            debug!(unfinished = self.running.len(), "socket closed: cancelling its unfinished requests");
        }
        for (_, (task, _)) in self.running.drain() {
            task.abort();
        }
    }

    async fn send(&mut self, frame: Value) -> Result<(), actix_ws::Closed> {
        self.session.text(frame.to_string()).await
    }

    /// Handles one client frame; returns the frame to answer with, if any.
    async fn on_frame(&mut self, text: &str, tx: &mpsc::UnboundedSender<Outgoing>) -> Option<Value> {
        let received_unix_us = now_unix_us();
        let frame = match ClientFrame::decode(text) {
            Ok(frame) => frame,
            Err((reference, e)) => return Some(error_frame(reference, None, e.code(), e.to_string())),
        };
        match frame {
            ClientFrame::Query { reference, submission } => {
                if self.running.len() >= self.max_in_flight {
                    let e = ApiError::SocketBusy(self.max_in_flight);
                    return Some(error_frame(reference, None, e.code(), e.to_string()));
                }
                let submission = Submission { tenant: self.tenant.clone(), ..*submission };
                match self.frontend.submit_and_follow(submission, received_unix_us).await {
                    Ok((accepted, follower)) => {
                        let request_id = accepted.request_id.clone();
                        let ctx = follower.context().clone();
                        let task = tokio::task::spawn_local(follow(follower, tx.clone()));
                        self.running.insert(request_id.clone(), (task, ctx));
                        Some(json!({
                            "type": "accepted",
                            "ref": reference,
                            "request_id": request_id,
                            "created": accepted.created,
                        }))
                    }
                    Err(e) => Some(error_frame(reference, None, e.code(), e.to_string())),
                }
            }
            // The request's follower stays: it reports the terminal result, CANCELLED or
            // whatever ended the request first.
            ClientFrame::Cancel { request_id } => match self.running.get(&request_id) {
                Some((_, ctx)) => self
                    .frontend
                    .gateway
                    .cancel(ctx)
                    .await
                    .err()
                    .map(|e| error_frame(None, Some(&request_id), e.code(), e.to_string())),
                None => Some(error_frame(
                    None,
                    Some(&request_id),
                    "unknown_request",
                    "no unfinished request with this id on this socket".to_owned(),
                )),
            },
        }
    }
}

/// Forwards one request's events to the socket until its result.
async fn follow(mut follower: Follower, tx: mpsc::UnboundedSender<Outgoing>) {
    let request_id = follower.request_id().to_owned();
    let mut index = 0u32;
    while let Some(event) = follower.next().await {
        let frame = match event {
            Ok(Event::Text(text)) => {
                index += 1;
                json!({ "type": "token", "request_id": request_id, "index": index - 1, "text": text })
            }
            Ok(Event::Finished(row)) => json!({ "type": "result", "request_id": request_id, "result": row }),
            Err(e) => error_frame(None, Some(&request_id), e.code(), e.to_string()),
        };
        if tx.unbounded_send(Outgoing::Frame(frame)).is_err() {
            return;
        }
    }
    let _ = tx.unbounded_send(Outgoing::Ended(request_id));
}

fn error_frame(reference: Option<String>, request_id: Option<&str>, code: &str, message: String) -> Value {
    json!({ "type": "error", "ref": reference, "request_id": request_id, "error": { "code": code, "message": message } })
}

/// A decoded client frame.
#[derive(Debug, PartialEq)]
enum ClientFrame {
    Query { reference: Option<String>, submission: Box<Submission> },
    Cancel { request_id: String },
}

/// Why a frame was refused; carries the submit's own error where the query was at fault.
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("bad frame: {0}")]
    Bad(String),
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl FrameError {
    fn code(&self) -> &'static str {
        match self {
            Self::Bad(_) => "bad_frame",
            Self::Api(e) => e.code(),
        }
    }
}

impl From<SubmitError> for FrameError {
    fn from(e: SubmitError) -> Self {
        Self::Api(e.into())
    }
}

impl ClientFrame {
    /// The frame, or the error with the frame's `ref` when it could be read.
    fn decode(text: &str) -> Result<Self, (Option<String>, FrameError)> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| (None, SubmitError::MalformedJson(e.to_string()).into()))?;
        let Value::Object(mut object) = value else {
            return Err((None, FrameError::Bad("a frame is a JSON object".into())));
        };
        let reference = match object.remove("ref") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err((None, FrameError::Bad("`ref` must be a string".into()))),
        };
        let fail = |e: FrameError| (reference.clone(), e);
        let kind = object.remove("type");
        match kind.as_ref().and_then(Value::as_str) {
            Some("query") => {
                let query = object.remove("query").ok_or_else(|| fail(SubmitError::MissingField("query").into()))?;
                let mut submission = submission_from_json(query, Some("query")).map_err(|e| fail(e.into()))?;
                submission.idempotency_key = match object.remove("idempotency_key") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(key)) => Some(key),
                    Some(_) => return Err(fail(SubmitError::BadIdempotencyKey("must be a string".into()).into())),
                };
                if let Some(name) = object.keys().next() {
                    return Err(fail(SubmitError::UnknownField(name.clone()).into()));
                }
                Ok(Self::Query { reference, submission: Box::new(submission) })
            }
            Some("cancel") => match object.remove("request_id") {
                Some(Value::String(id)) => {
                    let request_id = crate::gateway::parse_request_id(&id).map_err(|e| fail(e.into()))?;
                    Ok(Self::Cancel { request_id })
                }
                _ => Err(fail(SubmitError::MissingField("request_id").into())),
            },
            _ => Err(fail(FrameError::Bad(format!(
                "`type` must be \"query\" or \"cancel\", got {}",
                kind.unwrap_or(Value::Null)
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> (Option<String>, &'static str) {
        let (reference, e) = ClientFrame::decode(text).expect_err(text);
        (reference, e.code())
    }

    #[test]
    fn query_frames_carry_a_submit() {
        let frame = ClientFrame::decode(
            r#"{"type":"query","ref":"c1","idempotency_key":"k","query":{"text":"hi","user":"u","params":{"max_new_tokens":4}}}"#,
        )
        .unwrap();
        let ClientFrame::Query { reference, submission } = frame else { panic!("not a query") };
        assert_eq!(reference.as_deref(), Some("c1"));
        assert_eq!((submission.text.as_deref(), submission.user.as_deref()), (Some("hi"), Some("u")));
        assert_eq!((submission.idempotency_key.as_deref(), submission.params.max_new_tokens), (Some("k"), 4));
    }

    #[test]
    fn cancel_frames_name_a_request() {
        let id = "0190a5b2-7c3d-7e4f-8a1b-2c3d4e5f6a7b";
        let frame =
            ClientFrame::decode(&format!(r#"{{"type":"cancel","request_id":"{}"}}"#, id.to_uppercase())).unwrap();
        assert_eq!(frame, ClientFrame::Cancel { request_id: id.into() });
    }

    #[test]
    fn bad_frames_get_specific_codes_and_keep_their_ref() {
        assert_eq!(refused("{"), (None, "malformed_json"));
        assert_eq!(refused("[1]"), (None, "bad_frame"));
        assert_eq!(refused(r#"{"type":"shout","ref":"r"}"#), (Some("r".into()), "bad_frame"));
        assert_eq!(refused(r#"{"type":"query","ref":"r"}"#), (Some("r".into()), "missing_field"));
        assert_eq!(refused(r#"{"type":"query","query":{"text":"x","bogus":1}}"#), (None, "unknown_field"));
        assert_eq!(refused(r#"{"type":"query","query":{"text":"x"},"extra":1}"#), (None, "unknown_field"));
        assert_eq!(refused(r#"{"type":"query","query":{"text":7}}"#), (None, "wrong_type"));
        assert_eq!(refused(r#"{"type":"cancel","request_id":"nope"}"#), (None, "invalid_request_id"));
        assert_eq!(refused(r#"{"type":"cancel"}"#), (None, "missing_field"));
    }
}
