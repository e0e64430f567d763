//! The sink's results API, as `GET /v1/queries/{id}` reads it.
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use tracing::warn;

use crate::error::ApiError;

/// A status read must not hang on a slow sink; the client can simply ask again.
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct ResultsClient {
    http: reqwest::Client,
    base_url: String,
}

impl ResultsClient {
    pub fn new(base_url: &str) -> reqwest::Result<Self> {
        let http = reqwest::Client::builder().timeout(TIMEOUT).build()?;
        Ok(Self { http, base_url: base_url.trim_end_matches('/').to_owned() })
    }

    /// The request's terminal row as the sink's JSON, or `None` while the sink has no row for it.
    /// The sink cannot tell "not finished yet" from "never submitted": both are `None`.
    pub async fn get(&self, request_id: &str) -> Result<Option<Bytes>, ApiError> {
        let unavailable = |detail: String| {
            warn!(request_id, %detail, "results lookup failed");
            ApiError::ResultsUnavailable(detail)
        };
        let url = format!("{}/v1/results/{request_id}", self.base_url);
        let response = self.http.get(url).send().await.map_err(|e| unavailable(e.to_string()))?;
        match response.status() {
            StatusCode::OK => Ok(Some(response.bytes().await.map_err(|e| unavailable(e.to_string()))?)),
            StatusCode::NOT_FOUND => Ok(None),
            status => Err(unavailable(format!("the sink answered {status}"))),
        }
    }
}
