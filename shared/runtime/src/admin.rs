//! The admin server: `/healthz` (the process is alive), `/readyz` (every child is up and the
//! process is not draining), `/metrics` (Prometheus text).
use std::net::SocketAddr;

use actix_web::{App, HttpResponse, HttpServer, web};

use crate::servers::serve_http;
use crate::supervisor::{ChildContext, ChildSpec, Readiness};

pub fn child(addr: SocketAddr, readiness: Readiness) -> ChildSpec {
    ChildSpec::new("admin", move |ctx: ChildContext| {
        let readiness = readiness.clone();
        async move {
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(web::Data::new(readiness.clone()))
                    .route("/healthz", web::get().to(|| async { HttpResponse::Ok().body("ok") }))
                    .route("/readyz", web::get().to(readyz))
                    .route("/metrics", web::get().to(metrics))
            })
            .workers(1)
            .disable_signals()
            .shutdown_timeout(1)
            .bind(addr)?
            .run();
            serve_http(ctx, server).await
        }
    })
}

async fn readyz(readiness: web::Data<Readiness>) -> HttpResponse {
    let body = serde_json::json!({ "ready": readiness.is_ready(), "children": readiness.children() });
    if readiness.is_ready() { HttpResponse::Ok().json(body) } else { HttpResponse::ServiceUnavailable().json(body) }
}

async fn metrics() -> HttpResponse {
    let mut text = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&prometheus::gather(), &mut text) {
        Ok(()) => HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(text),
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}
