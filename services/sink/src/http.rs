//! HTTP results API: `GET /v1/results/{id}`, `GET /v1/results?user=&status=&page_size=&page_token=`.
use actix_web::{HttpResponse, ResponseError, web};
use serde::Deserialize;

use crate::api::{self, ApiError, ListParams};
use crate::store::Store;

impl ResponseError for ApiError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        self.http_status()
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.http_status())
            .json(serde_json::json!({ "error": { "code": self.code(), "message": self.to_string() } }))
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/results/{id}", web::get().to(get)).route("/v1/results", web::get().to(list));
}

async fn get(store: web::Data<Store>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(api::get(&store, &id).await?))
}

#[derive(Deserialize)]
struct ListForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    page_size: u32,
    #[serde(default)]
    page_token: String,
}

async fn list(store: web::Data<Store>, form: web::Query<ListForm>) -> Result<HttpResponse, ApiError> {
    let page = api::list(
        &store,
        ListParams { user: &form.user, status: &form.status, page_size: form.page_size, page_token: &form.page_token },
    )
    .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "results": page.results, "next_page_token": page.next_page_token })))
}
