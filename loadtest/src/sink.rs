//! The sink's results API: `GET /v1/results/{id}` and `GET /v1/results?user=…` (paged).
use std::time::Duration;

use millrace_proto::v1::{StageTiming, TerminalStatus};
use reqwest::Url;
use serde::Deserialize;

use crate::client::chain;

/// Rows per listing page (the sink allows up to 1000).
const PAGE_SIZE: u32 = 500;
/// A sink that accepts no connection is down: say so soon rather than wait on the OS.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Nor may a sink that accepted the connection but never answers hang the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The fields of a sink row the harness reads. Others (prompt, completion, verdicts) are
/// skipped while decoding, so a long run's rows do not hold every completion in memory.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SinkRow {
    pub request_id: String,
    #[serde(default)]
    pub user: String,
    #[serde(with = "millrace_proto::row::status_name")]
    pub status: TerminalStatus,
    #[serde(default)]
    pub timings: Vec<StageTiming>,
    #[serde(default)]
    pub stored_unix_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink request failed: {}", chain(.0))]
    Http(#[from] reqwest::Error),
    #[error("sink answered {status} to {url}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("sink URL {0:?} is not an http(s) base URL")]
    BadUrl(String),
}

impl SinkError {
    /// One line for the report: `sink unreachable at <url>: …` when no answer came (refused,
    /// reset, timed out), `sink unreadable: …` when the answer was an error or not a page of rows.
    pub fn describe(&self, sink_url: &str) -> String {
        match self {
            Self::Http(e) if !e.is_decode() && !e.is_status() => {
                format!("sink unreachable at {sink_url}: {}", chain(e))
            }
            other => format!("sink unreadable: {other}"),
        }
    }
}

pub struct SinkClient {
    http: reqwest::Client,
    base: Url,
}

impl SinkClient {
    pub fn new(sink_url: &str) -> Result<Self, SinkError> {
        let base = Url::parse(sink_url)
            .ok()
            .filter(|u| !u.cannot_be_a_base())
            .ok_or_else(|| SinkError::BadUrl(sink_url.to_owned()))?;
        let http = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).timeout(REQUEST_TIMEOUT).build()?;
        Ok(Self { http, base })
    }

    /// The base URL as given, for messages.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// The base URL with `segments` appended (each percent-encoded as needed).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("checked to be a base in new").pop_if_empty().extend(segments);
        url
    }

    /// The row of `request_id`, or `None` while the sink has none.
    pub async fn get(&self, request_id: &str) -> Result<Option<SinkRow>, SinkError> {
        let url = self.url(&["v1", "results", request_id]);
        let response = self.http.get(url.clone()).send().await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(checked(url.as_str(), response).await?.json().await?))
    }

    /// Every row of `user`, all pages.
    pub async fn list_user(&self, user: &str) -> Result<Vec<SinkRow>, SinkError> {
        #[derive(Deserialize)]
        struct Page {
            results: Vec<SinkRow>,
            #[serde(default)]
            next_page_token: String,
        }
        let url = self.url(&["v1", "results"]);
        let mut rows = Vec::new();
        let mut page_token = String::new();
        loop {
            let page_size = PAGE_SIZE.to_string();
            let query = [("user", user), ("page_size", &page_size), ("page_token", &page_token)];
            let response = self.http.get(url.clone()).query(&query).send().await?;
            let page: Page = checked(url.as_str(), response).await?.json().await?;
            rows.extend(page.results);
            if page.next_page_token.is_empty() {
                return Ok(rows);
            }
            page_token = page.next_page_token;
        }
    }
}

async fn checked(url: &str, response: reqwest::Response) -> Result<reqwest::Response, SinkError> {
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    Err(SinkError::Status { url: url.to_owned(), status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_row_decodes_to_the_fields_the_harness_reads() {
        let row: SinkRow = serde_json::from_str(
            r#"{"request_id":"r1","tenant":"t","user":"u","session":"s","model":"m","model_version":"v",
                "status":"COMPLETED","reason":"","detail":"","stage":"moderation-output","prompt":"p","completion":"c",
                "verdicts":[],"timings":[{"stage":"ingest","received_unix_us":1,"finished_unix_us":2}],
                "prompt_tokens":3,"completion_tokens":4,"accepted_unix_ms":5,"stored_unix_ms":6}"#,
        )
        .unwrap();
        assert_eq!((row.request_id.as_str(), row.user.as_str(), row.status), ("r1", "u", TerminalStatus::Completed));
        assert_eq!(row.timings, vec![StageTiming { stage: "ingest".into(), received_unix_us: 1, finished_unix_us: 2 }]);
        assert_eq!(row.stored_unix_ms, 6);
    }

    #[test]
    fn urls_are_built_from_the_base_with_encoded_segments() {
        let sink = SinkClient::new("http://127.0.0.1:8090/").unwrap();
        assert_eq!(sink.url(&["v1", "results", "a/b"]).as_str(), "http://127.0.0.1:8090/v1/results/a%2Fb");
        assert!(matches!(SinkClient::new("127.0.0.1:8090"), Err(SinkError::BadUrl(_))));
    }
}
