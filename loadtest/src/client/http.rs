//! OpenAI-compatible streaming chat: `POST /v1/chat/completions` with `stream: true`, answered
//! with server-sent events.
use serde::Deserialize;
use serde_json::json;

use super::{ClientError, Trace, bearer};
use millrace_proto::v1::TerminalStatus;

use crate::record::{Ending, Told};
use crate::workload::Query;

pub struct HttpClient {
    http: reqwest::Client,
    url: String,
}

impl HttpClient {
    pub fn new(ingest_url: &str, api_key: Option<&str>) -> Result<Self, ClientError> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = api_key {
            headers.insert(reqwest::header::AUTHORIZATION, bearer(key)?);
        }
        let http = reqwest::Client::builder().default_headers(headers).build()?;
        Ok(Self { http, url: format!("{}/v1/chat/completions", ingest_url.trim_end_matches('/')) })
    }

    pub async fn execute(&self, query: &Query, trace: &mut Trace) -> Result<Ending, ClientError> {
        // The chat API has no deadline field: ingest gives chat requests its own.
        let mut body = json!({
            "model": query.model,
            "messages": [{ "role": "user", "content": query.text }],
            "max_tokens": query.max_new_tokens,
            "user": query.user,
            "stream": true,
        });
        if query.ignore_eos {
            body["ignore_eos"] = true.into();
        }
        let mut response = self.http.post(&self.url).header("X-Session-Id", &query.session).json(&body).send().await?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.bytes().await.unwrap_or_default();
            return Ok(Ending::Rejected {
                code: error_code(&body).unwrap_or_else(|| format!("http_{}", status.as_u16())),
            });
        }
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .ok_or(ClientError::Protocol("a 2xx answer without X-Request-Id"))?;
        trace.accepted(request_id.to_owned());

        let mut events = SseParser::default();
        let mut ending = None;
        // Read through `[DONE]` even after the terminal chunk so the connection goes back to
        // the pool instead of being torn down.
        while let Some(bytes) = response.chunk().await? {
            for data in events.push(&bytes) {
                match ChatEvent::parse(&data)? {
                    ChatEvent::Done => return ending.ok_or(ClientError::Protocol("[DONE] before a finish_reason")),
                    ChatEvent::Error { code } => ending = Some(trace.terminal(Told::StreamError(code))),
                    ChatEvent::Chunk { content, finish_reason } => {
                        trace.token(&content);
                        if let Some(reason) = finish_reason {
                            ending = Some(trace.terminal(status_of_finish(&reason)));
                        }
                    }
                }
            }
        }
        ending.ok_or(ClientError::Protocol("the event stream ended without a finish_reason"))
    }
}

/// The code of an `{"error": {"code": ...}}` body, if it is one.
fn error_code(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Body {
        error: ErrorObject,
    }
    serde_json::from_slice::<Body>(body).ok().map(|b| b.error.code_or_type())
}

#[derive(Deserialize)]
struct ErrorObject {
    #[serde(default)]
    code: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

impl ErrorObject {
    fn code_or_type(self) -> String {
        self.code.or(self.kind).unwrap_or_else(|| "unknown".to_owned())
    }
}

fn status_of_finish(reason: &str) -> Told {
    match reason {
        "stop" | "length" => Told::Status(TerminalStatus::Completed),
        "content_filter" => Told::Blocked,
        other => Told::Finish(other.to_owned()),
    }
}

/// Splits a server-sent event stream into the `data` of each event, across chunk boundaries.
#[derive(Default)]
struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    /// Adds received bytes; returns the data of every event they complete.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        // Line ends may be CRLF; JSON payloads never hold a raw CR, so dropping them is safe.
        self.buffer.extend(bytes.iter().filter(|b| **b != b'\r'));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block[..end]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

/// One event of a chat completion stream.
#[derive(Debug, PartialEq)]
enum ChatEvent {
    Chunk { content: String, finish_reason: Option<String> },
    Error { code: String },
    Done,
}

impl ChatEvent {
    fn parse(data: &str) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Payload {
            #[serde(default)]
            choices: Vec<Choice>,
            #[serde(default)]
            error: Option<ErrorObject>,
        }
        #[derive(Deserialize)]
        struct Choice {
            #[serde(default)]
            delta: Delta,
            #[serde(default)]
            finish_reason: Option<String>,
        }
        #[derive(Deserialize, Default)]
        struct Delta {
            #[serde(default)]
            content: Option<String>,
        }

        if data.trim() == "[DONE]" {
            return Ok(Self::Done);
        }
        let payload: Payload = serde_json::from_str(data)?;
        if let Some(error) = payload.error {
            return Ok(Self::Error { code: error.code_or_type() });
        }
        let choice = payload.choices.into_iter().next();
        Ok(match choice {
            Some(c) => Self::Chunk { content: c.delta.content.unwrap_or_default(), finish_reason: c.finish_reason },
            None => Self::Chunk { content: String::new(), finish_reason: None },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_reassembled_across_chunks() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"data: {\"a\"").is_empty());
        assert_eq!(parser.push(b":1}\n\ndata: [DONE]\r\n\r\n: comment\n\n"), vec!["{\"a\":1}", "[DONE]"]);
        assert_eq!(parser.push(b"data: x\ndata: y\n\n"), vec!["x\ny"]);
        assert!(parser.buffer.is_empty());
    }

    #[test]
    fn chat_events_parse_role_content_finish_error_and_done() {
        let chunk = |delta: &str, finish: &str| {
            format!(
                r#"{{"id":"c","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]}}"#
            )
        };
        assert_eq!(
            ChatEvent::parse(&chunk(r#"{"role":"assistant","content":""}"#, "null")).unwrap(),
            ChatEvent::Chunk { content: String::new(), finish_reason: None }
        );
        assert_eq!(
            ChatEvent::parse(&chunk(r#"{"content":"Paris"}"#, "null")).unwrap(),
            ChatEvent::Chunk { content: "Paris".into(), finish_reason: None }
        );
        assert_eq!(
            ChatEvent::parse(&chunk("{}", r#""length""#)).unwrap(),
            ChatEvent::Chunk { content: String::new(), finish_reason: Some("length".into()) }
        );
        assert_eq!(
            ChatEvent::parse(r#"{"error":{"message":"m","type":"timeout","param":null,"code":"expired"}}"#).unwrap(),
            ChatEvent::Error { code: "expired".into() }
        );
        assert_eq!(ChatEvent::parse("[DONE]").unwrap(), ChatEvent::Done);
        assert!(ChatEvent::parse("not json").is_err());
    }

    #[test]
    fn finish_reasons_and_error_bodies_map_to_codes() {
        assert_eq!(status_of_finish("stop"), Told::Status(TerminalStatus::Completed));
        assert_eq!(status_of_finish("length"), Told::Status(TerminalStatus::Completed));
        assert_eq!(status_of_finish("content_filter"), Told::Blocked);
        let body = br#"{"error":{"message":"busy","type":"rate_limit_error","param":null,"code":"overloaded"}}"#;
        assert_eq!(error_code(body).as_deref(), Some("overloaded"));
        assert_eq!(error_code(br#"{"error":{"type":"server_error"}}"#).as_deref(), Some("server_error"));
        assert_eq!(error_code(b"<html>"), None);
    }
}
