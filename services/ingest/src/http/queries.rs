//! The queries API: `POST /v1/queries`, `GET /v1/queries/{id}`, `DELETE /v1/queries/{id}`.
//!
//! The submit body is read raw (not through `web::Json`) so that size, encoding, syntax and
//! each field get their own error code and every error has the same JSON body.
use actix_web::http::header::ContentType;
use actix_web::{HttpRequest, HttpResponse, web};
use millrace_proto::now_unix_us;
use millrace_proto::v1::RequestContext;
use serde_json::json;

use super::request::{HttpApi, IDEMPOTENCY_KEY, REQUEST_ID, check_content_type, header, read_body, tenant};
use crate::error::ApiError;
use crate::gateway::parse_request_id;
use crate::json::decode_submission;
use crate::submit::{Submission, SubmitError};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/queries", web::post().to(submit))
        .route("/v1/queries/{id}", web::get().to(status))
        .route("/v1/queries/{id}", web::delete().to(cancel));
}

/// 202 `{"request_id", "status": "ACCEPTED"}` once the query is on the stream; 200 with status
/// `DUPLICATE` for a retry of an earlier submit with the same `Idempotency-Key`.
async fn submit(req: HttpRequest, body: web::Payload, api: web::Data<HttpApi>) -> Result<HttpResponse, ApiError> {
    let received_unix_us = now_unix_us();
    check_content_type(&req)?;
    let tenant = tenant(&req)?;
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
