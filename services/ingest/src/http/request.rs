//! What every HTTP API of ingest shares: the handlers' state, the headers they read and the
//! checks every JSON body gets (content type, size).
use actix_web::http::header::{self, HeaderName, ToStrError};
use actix_web::{HttpMessage, HttpRequest, mime, web};
use bytes::Bytes;

use crate::auth::KeyTenant;
use crate::follow::Frontend;
use crate::submit::SubmitError;

pub const TENANT: HeaderName = HeaderName::from_static("x-tenant");
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the handlers share; each worker gets a clone.
#[derive(Clone)]
pub struct HttpApi {
    pub frontend: Frontend,
    pub max_body_bytes: usize,
    pub ws_max_in_flight: usize,
}

/// `application/json` or any `application/*+json`.
pub fn check_content_type(req: &HttpRequest) -> Result<(), SubmitError> {
    match req.mime_type() {
        Ok(Some(m))
            if m.type_() == mime::APPLICATION && (m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON)) =>
        {
            Ok(())
        }
        _ => Err(SubmitError::UnsupportedMediaType(
            req.headers()
                .get(header::CONTENT_TYPE)
                .map_or_else(|| "(none)".to_owned(), |v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        )),
    }
}

/// The request's tenant: its API key's when keys are configured, else its `X-Tenant` header.
pub fn tenant(req: &HttpRequest) -> Result<Option<String>, SubmitError> {
    if let Some(KeyTenant(tenant)) = req.extensions().get::<KeyTenant>() {
        return Ok(Some(tenant.clone()));
    }
    header(req, TENANT).map_err(|_| SubmitError::BadIdentifier { field: "tenant" })
}

/// An optional header's value; an error when it is present but not visible ASCII.
pub fn header(req: &HttpRequest, name: HeaderName) -> Result<Option<String>, ToStrError> {
    req.headers().get(name).map(|v| v.to_str().map(str::to_owned)).transpose()
}

/// Reads the body, stopping as soon as it passes `limit` so an oversized one costs no more
/// than `limit` bytes of memory.
pub async fn read_body(body: web::Payload, limit: usize) -> Result<Bytes, SubmitError> {
    match body.to_bytes_limited(limit).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(SubmitError::UnreadableBody(e.to_string())),
        Err(_) => Err(SubmitError::BodyTooLarge { max: limit }),
    }
}
