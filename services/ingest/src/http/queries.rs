//! The HTTP API: `POST /v1/queries`, `GET /v1/queries/{id}`, `DELETE /v1/queries/{id}`.
//!
//! The submit body is read raw (not through `web::Json`) so that size, encoding, syntax and
//! each field get their own error code and every error has the same JSON body.
use std::net::SocketAddr;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, ContentType, HeaderName, HeaderValue, ToStrError};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpMessage, HttpRequest, HttpResponse, HttpServer, mime, web};
use bytes::Bytes;
use millrace_proto::now_unix_us;
use millrace_proto::v1::RequestContext;
use serde_json::json;
use tracing::info;
use uuid::Uuid;

use crate::error::ApiError;
use crate::follow::Frontend;
use crate::gateway::parse_request_id;
use crate::json::decode_submission;
use crate::submit::{Submission, SubmitError};

pub(crate) const TENANT: HeaderName = HeaderName::from_static("x-tenant");
pub(crate) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the handlers share; each worker gets a clone.
#[derive(Clone)]
pub struct HttpApi {
    pub frontend: Frontend,
    pub max_body_bytes: usize,
    pub ws_max_in_flight: usize,
}

/// The server, bound; run it with `millrace_runtime::serve_http`.
pub fn server(api: HttpApi, addr: SocketAddr) -> std::io::Result<Server> {
    Ok(HttpServer::new(move || {
        App::new().app_data(web::Data::new(api.clone())).wrap(from_fn(request_id_on_every_response)).configure(routes)
    })
    // The shell owns SIGTERM and drains every child; an in-flight submit waits at most one
    // PubAck timeout (5 s by default).
    .disable_signals()
    .shutdown_timeout(10)
    .bind(addr)?
    .run())
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/queries", web::post().to(submit))
        .route("/v1/queries/{id}", web::get().to(status))
        .route("/v1/queries/{id}", web::delete().to(cancel))
        .configure(crate::openai::routes)
        .configure(crate::ws::routes);
}

/// 202 `{"request_id", "status": "ACCEPTED"}` once the query is on the stream; 200 with status
/// `DUPLICATE` for a retry of an earlier submit with the same `Idempotency-Key`.
async fn submit(req: HttpRequest, body: web::Payload, api: web::Data<HttpApi>) -> Result<HttpResponse, ApiError> {
    let received_unix_us = now_unix_us();
    check_content_type(&req)?;
    let tenant = header(&req, TENANT).map_err(|_| SubmitError::BadIdentifier { field: "tenant" })?;
    let idempotency_key =
        header(&req, IDEMPOTENCY_KEY).map_err(|_| SubmitError::BadIdempotencyKey("must be visible ASCII".into()))?;
    let body = read_body(body, api.max_body_bytes).await?;
    let submission = decode_submission(&body)?;
    let accepted =
        api.frontend.gateway.submit(Submission { tenant, idempotency_key, ..submission }, received_unix_us).await?;
    let (mut response, status) =
        if accepted.created { (HttpResponse::Accepted(), "ACCEPTED") } else { (HttpResponse::Ok(), "DUPLICATE") };
    Ok(response
        .insert_header((REQUEST_ID, accepted.request_id.as_str()))
        .json(json!({ "request_id": accepted.request_id, "status": status })))
}

/// The sink's terminal row, or `{"request_id", "status": "PENDING"}` while there is none. An id
/// ingest never issued also reads as pending: the sink cannot tell the two apart.
async fn status(id: web::Path<String>, api: web::Data<HttpApi>) -> Result<HttpResponse, ApiError> {
    let request_id = parse_request_id(&id)?;
    let mut response = HttpResponse::Ok();
    response.insert_header((REQUEST_ID, request_id.as_str()));
    Ok(match api.frontend.results.get(&request_id).await? {
        Some(row) => response.content_type(ContentType::json()).body(row),
        None => response.json(json!({ "request_id": request_id, "status": "PENDING" })),
    })
}

/// 202 `{"request_id", "status": "CANCELLING"}`: the terminal CANCELLED result is on the stream
/// (unless the request already has a terminal result, which then stands).
async fn cancel(id: web::Path<String>, api: web::Data<HttpApi>) -> Result<HttpResponse, ApiError> {
    let request_id = parse_request_id(&id)?;
    api.frontend.gateway.cancel(&RequestContext { request_id: request_id.clone(), ..Default::default() }).await?;
    Ok(HttpResponse::Accepted()
        .insert_header((REQUEST_ID, request_id.as_str()))
        .json(json!({ "request_id": request_id, "status": "CANCELLING" })))
}

/// Answers that name no request (refused input, a status read, `/v1/models`) get a fresh id of
/// their own, logged with the refusal, so any answer can be traced to a log line.
async fn request_id_on_every_response(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let mut response = next.call(req).await?;
    if !response.headers().contains_key(REQUEST_ID) {
        let id = Uuid::now_v7().hyphenated().to_string();
        let status = response.status();
        if status.is_client_error() || status.is_server_error() {
            info!(request_id = id, %status, path = response.request().path(), "request refused");
        }
        let value = HeaderValue::from_str(&id).expect("a UUID is a valid header value");
        response.headers_mut().insert(REQUEST_ID, value);
    }
    Ok(response)
}

/// `application/json` or any `application/*+json`.
pub(crate) fn check_content_type(req: &HttpRequest) -> Result<(), SubmitError> {
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

/// An optional header's value; an error when it is present but not visible ASCII.
pub(crate) fn header(req: &HttpRequest, name: HeaderName) -> Result<Option<String>, ToStrError> {
    req.headers().get(name).map(|v| v.to_str().map(str::to_owned)).transpose()
}

/// Reads the body, stopping as soon as it passes `limit` so an oversized one costs no more
/// than `limit` bytes of memory.
pub(crate) async fn read_body(body: web::Payload, limit: usize) -> Result<Bytes, SubmitError> {
    match body.to_bytes_limited(limit).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(SubmitError::UnreadableBody(e.to_string())),
        Err(_) => Err(SubmitError::BodyTooLarge { max: limit }),
    }
}
