//! The results API shared by HTTP and gRPC: request validation and one mapping of errors to
//! HTTP statuses and gRPC codes.
use actix_web::http::StatusCode;
use millrace_proto::ErrorClass;
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
    fn class(&self) -> (&'static str, ErrorClass) {
        match self {
            Self::NotFound(_) => ("not_found", ErrorClass::NotFound),
            Self::BadStatus(_) => ("bad_status", ErrorClass::BadRequest),
            Self::BadPageSize(_) => ("bad_page_size", ErrorClass::BadRequest),
            Self::BadPageToken => ("bad_page_token", ErrorClass::BadRequest),
            Self::Store(_) => ("store_unavailable", ErrorClass::Unavailable),
        }
    }

    pub fn code(&self) -> &'static str {
        self.class().0
    }

    pub fn http_status(&self) -> StatusCode {
        StatusCode::from_u16(self.class().1.http_status()).expect("the class table holds valid statuses")
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let (code, class) = e.class();
        millrace_proto::coded_status(class, code, &e)
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
