//! OpenAI's `POST /v1/moderations` over the moderation service's `Check` (the same policy and
//! classifier that moderate every request's input): `input` a string or an array of strings,
//! `model` accepted as a label only (there is one moderation policy). Each result has
//! `flagged` (the policy would flag or block the text), and `categories` /
//! `category_scores` keyed by the **policy's** categories that hit (not OpenAI's taxonomy),
//! plus a `millrace` object with the action, the policy version and the verdicts' rules.
use actix_web::{HttpRequest, HttpResponse, web};
use millrace_proto::v1::CheckRequest;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::openai::{OpenAiError, no_more_fields, not_configured, texts_call};
use super::request::HttpApi;

/// Most inputs one call may check.
const MAX_INPUTS: usize = 32;
const MODEL: &str = "millrace-moderation";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/moderations", web::post().to(moderations));
}

async fn moderations(
    req: HttpRequest,
    body: web::Payload,
    api: web::Data<HttpApi>,
) -> Result<HttpResponse, OpenAiError> {
    let (object, texts, model) = texts_call(&req, body, &api, MAX_INPUTS).await?;
    no_more_fields(&object)?;
    let moderation =
        api.frontend.moderation.clone().ok_or_else(|| not_configured("/v1/moderations", "--moderation-url"))?;
    let checks = texts.into_iter().map(|text| {
        let mut moderation = moderation.clone();
        async move { moderation.check(CheckRequest { text, stage: "input".into() }).await.map(|r| r.into_inner()) }
    });
    let mut results = Vec::new();
    for checked in futures::future::join_all(checks).await {
        let checked = checked?;
        let hits = checked.verdicts.iter().filter(|v| !v.category.is_empty() && v.action != "allow");
        let mut categories = Map::new();
        let mut scores = Map::new();
        for v in hits {
            categories.insert(v.category.clone(), json!(true));
            let best = scores.get(&v.category).and_then(Value::as_f64).unwrap_or(0.0).max(f64::from(v.score));
            scores.insert(v.category.clone(), json!(best));
        }
        results.push(json!({
            "flagged": checked.action != "allow",
            "categories": categories,
            "category_scores": scores,
            "millrace": {
                "action": checked.action,
                "policy_version": checked.policy_version,
                "rules": checked.verdicts.iter().map(|v| &v.rule).filter(|r| !r.is_empty()).collect::<Vec<_>>(),
            },
        }));
    }
    Ok(HttpResponse::Ok().json(json!({
        "id": format!("modr-{}", Uuid::now_v7().simple()),
        "model": model.unwrap_or_else(|| MODEL.to_owned()),
        "results": results,
    })))
}
