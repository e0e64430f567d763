//! OpenAI's `POST /v1/embeddings` over inference's `Embed` (the mesh's sentence encoder,
//! MiniLM by default): `input` a string or an array of strings, `model` the encoder's name (or
//! absent), `encoding_format` `float` (default) or `base64` (little-endian f32, as OpenAI
//! sends it); `dimensions` other than the encoder's own are refused. One call embeds every
//! input in one batch; `usage` counts the encoder's tokens. The vectors are L2-normalized.
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use millrace_proto::v1::EmbedRequest;
use serde_json::{Value, json};

use super::openai::{OpenAiError, no_more_fields, not_configured, take, texts_call};
use super::request::HttpApi;

/// Most inputs one call may embed (inference's own bound).
const MAX_INPUTS: usize = 256;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/embeddings", web::post().to(embeddings));
}

async fn embeddings(
    req: HttpRequest,
    body: web::Payload,
    api: web::Data<HttpApi>,
) -> Result<HttpResponse, OpenAiError> {
    let (mut object, texts, model) = texts_call(&req, body, &api, MAX_INPUTS).await?;
    let base64 = match take::<String>(&mut object, "encoding_format")?.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(bad("encoding_format", format!("`encoding_format` must be float or base64, got {other:?}")));
        }
    };
    let dimensions: Option<usize> = take(&mut object, "dimensions")?;
    let _user: Option<String> = take(&mut object, "user")?;
    no_more_fields(&object)?;

    let mut inference =
        api.frontend.inference.clone().ok_or_else(|| not_configured("/v1/embeddings", "--inference-url"))?;
    let request = EmbedRequest { model: model.unwrap_or_default(), texts };
    let response = inference.embed(request).await?.into_inner();
    let width = response.embeddings.first().map_or(0, |e| e.values.len());
    if let Some(d) = dimensions.filter(|&d| d != width) {
        return Err(bad("dimensions", format!("this encoder's embeddings have {width} dimensions, not {d}")));
    }
    let tokens: u32 = response.embeddings.iter().map(|e| e.tokens).sum();
    let data: Vec<Value> = response
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(index, e)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = e.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(e.values)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": data,
        "model": response.model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    })))
}

fn bad(param: &'static str, message: String) -> OpenAiError {
    OpenAiError::invalid(StatusCode::BAD_REQUEST, Some(param), "invalid_value", message)
}
