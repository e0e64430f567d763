//! The results API shared by HTTP and gRPC: request validation and one mapping of errors to
//! HTTP statuses and gRPC codes.
use actix_web::http::StatusCode;
use millrace_proto::v1::TerminalStatus;

use crate::row::ResultRow;
use crate::store::{Cursor, ListQuery, Store, StoreError};

pub const MAX_PAGE_SIZE: u32 = 1000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no result for request {0}")]
    NotFound(String),
    #[error("unknown status {0:?}")]
    BadStatus(String),
    #[error("page_size must be 1..={MAX_PAGE_SIZE}, got {0}")]
    BadPageSize(u32),
    #[error("page_token is not one this API issued")]
    BadPageToken,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::BadStatus(_) => "bad_status",
            Self::BadPageSize(_) => "bad_page_size",
            Self::BadPageToken => "bad_page_token",
            Self::Store(_) => "store_unavailable",
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadStatus(_) | Self::BadPageSize(_) | Self::BadPageToken => StatusCode::BAD_REQUEST,
            Self::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let code = match e {
            ApiError::NotFound(_) => tonic::Code::NotFound,
            ApiError::BadStatus(_) | ApiError::BadPageSize(_) | ApiError::BadPageToken => tonic::Code::InvalidArgument,
            ApiError::Store(_) => tonic::Code::Unavailable,
        };
        millrace_proto::coded_status(code, e.code(), &e)
    }
}

/// A listing request as both APIs receive it (empty strings and 0 mean "not given").
pub struct ListParams<'a> {
    pub user: &'a str,
    pub status: &'a str,
    pub page_size: u32,
    pub page_token: &'a str,
}

pub struct Page {
    pub results: Vec<ResultRow>,
    pub next_page_token: String,
}

pub async fn get(store: &Store, request_id: &str) -> Result<ResultRow, ApiError> {
    store.get(request_id).await?.ok_or_else(|| ApiError::NotFound(request_id.to_owned()))
}

pub async fn list(store: &Store, p: ListParams<'_>) -> Result<Page, ApiError> {
    let status = match p.status {
        "" => None,
        s => Some(
            TerminalStatus::parse(s)
                .filter(|s| *s != TerminalStatus::Unspecified)
                .ok_or_else(|| ApiError::BadStatus(s.to_owned()))?,
        ),
    };
    let page_size = match p.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n <= MAX_PAGE_SIZE => n,
        n => return Err(ApiError::BadPageSize(n)),
    };
    let after = match p.page_token {
        "" => None,
        t => Some(Cursor::decode(t).ok_or(ApiError::BadPageToken)?),
    };
    let query = ListQuery { user: Some(p.user.to_owned()).filter(|u| !u.is_empty()), status, page_size, after };
    let (results, next) = store.list(&query).await?;
    Ok(Page { results, next_page_token: next.map(|c| c.encode()).unwrap_or_default() })
}
