//! Every way an ingest API call can fail, mapped once to a machine-readable code, an HTTP status
//! and a gRPC code; the HTTP error body and the gRPC status are built here for both APIs.
use actix_web::http::{StatusCode, header};
use actix_web::{HttpResponse, ResponseError};
use millrace_bus::BusError;
use millrace_proto::ErrorClass;

use crate::submit::SubmitError;

/// How long an overloaded client should wait before retrying, seconds (`Retry-After`).
const RETRY_AFTER_S: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Invalid(#[from] SubmitError),
    #[error("{0:?} is not a request id (a UUID)")]
    InvalidRequestId(String),
    /// The stream is at its limits (discard new): back-pressure reaches the client as 429.
    #[error("ingest is at capacity; retry after {RETRY_AFTER_S} s")]
    Overloaded(#[source] BusError),
    #[error("the message bus is unavailable; retry later")]
    Unavailable(#[source] BusError),
    #[error("the results store cannot be reached: {0}")]
    ResultsUnavailable(String),
    #[error("request {0} did not finish before its deadline")]
    DeadlinePassed(String),
    /// One WebSocket follows at most this many unfinished requests.
    #[error("this socket already has {0} unfinished requests")]
    SocketBusy(usize),
    #[error("internal error")]
    Internal(#[source] BusError),
    #[error("no API key: send `Authorization: Bearer <key>`")]
    MissingApiKey,
    #[error("the API key is not valid")]
    InvalidApiKey,
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::StreamFull { .. } => Self::Overloaded(e),
            BusError::Unavailable { .. } => Self::Unavailable(e),
            _ => Self::Internal(e),
        }
    }
}

impl ApiError {
    fn class(&self) -> (&'static str, ErrorClass) {
        match self {
            Self::Invalid(e) => e.class(),
            Self::InvalidRequestId(_) => ("invalid_request_id", ErrorClass::BadRequest),
            Self::Overloaded(_) => ("overloaded", ErrorClass::Overloaded),
            Self::Unavailable(_) => ("unavailable", ErrorClass::Unavailable),
            Self::ResultsUnavailable(_) => ("results_unavailable", ErrorClass::Unavailable),
            Self::DeadlinePassed(_) => ("timeout", ErrorClass::Timeout),
            Self::SocketBusy(_) => ("too_many_in_flight", ErrorClass::Overloaded),
            Self::Internal(_) => ("internal", ErrorClass::Internal),
            Self::MissingApiKey => ("missing_api_key", ErrorClass::Unauthenticated),
            Self::InvalidApiKey => ("invalid_api_key", ErrorClass::Unauthenticated),
        }
    }

    pub fn code(&self) -> &'static str {
        self.class().0
    }
}

/// `{"error": {"code": "...", "message": "..."}}` with the class's status.
impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.class().1.http_status()).expect("the class table holds valid statuses")
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, Self::Overloaded(_) | Self::SocketBusy(_)) {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_S));
        }
        response.json(serde_json::json!({ "error": { "code": self.code(), "message": self.to_string() } }))
    }
}

/// The code leads the message (`"empty_text: ..."`) and rides in `x-millrace-code` metadata.
impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let (code, class) = e.class();
        millrace_proto::coded_status(class, code, &e)
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn bus_errors_become_overload_or_unavailability() {
        assert_eq!(
            ApiError::from(BusError::StreamFull { context: "max msgs".into(), source: None }).code(),
            "overloaded"
        );
        assert_eq!(ApiError::from(BusError::gone("down")).code(), "unavailable");
        assert_eq!(ApiError::from(BusError::Other { context: "?".into(), source: None }).code(), "internal");
    }

    #[test]
    fn grpc_status_carries_the_code_twice() {
        let status = tonic::Status::from(ApiError::from(SubmitError::EmptyText));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("empty_text: "), "{}", status.message());
        assert_eq!(status.metadata().get(millrace_proto::CODE_METADATA).unwrap(), "empty_text");
        let status = tonic::Status::from(ApiError::from(BusError::StreamFull { context: "full".into(), source: None }));
        assert_eq!(status.code(), Code::ResourceExhausted);
    }

    #[test]
    fn overload_says_when_to_retry() {
        let response = ApiError::from(BusError::StreamFull { context: "full".into(), source: None }).error_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "1");
    }
}
