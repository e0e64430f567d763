//! Ingest's HTTP APIs, one module each: [`queries`] (`/v1/queries`), [`openai`] (OpenAI's
//! chat completions and models, and the error shape the OpenAI-style APIs share),
//! [`embeddings`] and [`moderations`] (OpenAI's, over inference and moderation) and [`ws`]
//! (the WebSocket `/v1/ws`); [`request`] holds what they share. This module binds them into
//! one server.
use std::net::SocketAddr;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpMessage, HttpServer, ResponseError, web};
use tracing::info;
use uuid::Uuid;

pub mod embeddings;
pub mod moderations;
pub mod openai;
pub mod queries;
pub mod request;
pub mod ws;

pub use request::HttpApi;
use request::REQUEST_ID;

/// The server, bound; run it with `millrace_runtime::serve_http`.
pub fn server(api: HttpApi, addr: SocketAddr) -> std::io::Result<Server> {
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(api.clone()))
            // Outermost last: a refused key's answer gets its request id too.
            .wrap(from_fn(authenticate))
            .wrap(from_fn(request_id_on_every_response))
            .configure(routes)
    })
    // The shell owns SIGTERM and drains every child; an in-flight submit waits at most one
    // PubAck timeout (5 s by default).
    .disable_signals()
    .shutdown_timeout(10)
    .bind(addr)?
    .run())
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.configure(queries::routes)
        .configure(openai::routes)
        .configure(embeddings::routes)
        .configure(moderations::routes)
        .configure(ws::routes);
}

/// Every route asks for an API key when keys are configured (see [`crate::auth`]); the key's
/// tenant rides in the request's extensions. A refusal is 401 in OpenAI's error shape, whose
/// `code` and `message` are the ingest API's shape too.
async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let api = req.app_data::<web::Data<HttpApi>>().expect("the server holds its HttpApi").clone();
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match api.frontend.keys.authenticate(authorization) {
        Ok(tenant) => {
            if let Some(tenant) = tenant {
                req.extensions_mut().insert(tenant);
            }
            Ok(next.call(req).await?.map_into_left_body())
        }
        Err(e) => Ok(req.into_response(openai::OpenAiError::from(e).error_response()).map_into_right_body()),
    }
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
