//! An OpenAI-compatible chat API over the mesh: `POST /v1/chat/completions` (plain or
//! `stream: true`) and `GET /v1/models`.
//!
//! A chat request becomes one ordinary submit (the same [`Submission`] checks as
//! `POST /v1/queries`):
//! - the request's `messages` are the conversation, as OpenAI's API is stateless: the prompt is
//!   the model's chat template over them, the system message included (it replaces the
//!   service's default one). The LAST message must be the user's: it is the query `text` (what
//!   input moderation checks and the stored row shows); the ones before it travel with it,
//!   redacted by preprocess like the text. No conversation is read or written, whoever the
//!   `user` is, so two clients never see each other's text;
//! - with an `X-Session-Id` header the session service keeps the conversation instead (as on
//!   `/v1/queries`): the stored history of (`user`, session) comes first, then the request's
//!   messages, and the new exchange is stored;
//! - roles `system` (or `developer`), `user` and `assistant`; content a string or an array of
//!   `text` parts;
//! - `model`, `temperature`, `top_p`, `max_tokens` (or `max_completion_tokens`), `stop` (a
//!   string or an array), `seed` map to the generation parameters; `stream_options.include_usage`
//!   adds a last chunk with the usage; `X-Tenant` and `Idempotency-Key` work as on
//!   `/v1/queries`; penalties are applied by the sampler; `n` candidates are sibling requests;
//!   `response_format` and required tool calls are enforced by constrained decoding. OpenAI
//!   parameters not implemented (the legacy `functions` / `function_call`) are accepted
//!   only at their default value and otherwise refused with 400 `unsupported_parameter`;
//!   unknown ones with 400 `unknown_field`, as OpenAI refuses unrecognized arguments — never
//!   silently ignored.
//!
//! The request gets a 60 s deadline (or the policy's maximum, if lower). Both answers follow the
//! request with a [`Follower`]: the plain one is built from the terminal result (moderation may
//! have replaced the generated text with a refusal); a stream sends the moderated text as it is
//! released, each piece a `chat.completion.chunk`, and ends with the outcome: `finish_reason`
//! `stop`/`length`, or `content_filter` for a blocked request; a request that ended otherwise
//! (rate limited, expired, ...) ends the stream with an `{"error": ...}` event. A client that
//! disconnects before the end cancels its request. Every failure is
//! `{"error": {"message", "type", "param", "code"}}`; every answer carries `X-Request-Id`.
use actix_web::http::StatusCode;
use actix_web::http::header::HeaderName;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use bytes::Bytes;
use millrace_proto::now_unix_us;
use millrace_proto::row::ResultRow;
use millrace_proto::v1::{ChatTurn, GenerationParams, TerminalStatus};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::request::{HttpApi, IDEMPOTENCY_KEY, REQUEST_ID, check_content_type, header, read_body, tenant};
use crate::error::ApiError;
use crate::follow::{Event, Follower};
use crate::submit::{Submission, SubmitError};

const SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");
const DEFAULT_USER: &str = "anonymous";
/// Most candidates one request may ask for (`n`).
const MAX_N: u32 = 8;

/// Deadline of a chat request, milliseconds (capped by the policy's maximum).
const CHAT_DEADLINE_MS: u32 = 60_000;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/chat/completions", web::post().to(chat_completions))
        .route("/v1/completions", web::post().to(completions))
        .route("/v1/models", web::get().to(models))
        .route("/v1/models/{id}", web::get().to(model));
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct OpenAiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: String,
    request_id: Option<String>,
}

impl OpenAiError {
    pub(crate) fn invalid(
        status: StatusCode,
        param: Option<&'static str>,
        code: &str,
        message: impl Into<String>,
    ) -> Self {
        Self { status, kind: kind_of(status), message: message.into(), param, code: code.to_owned(), request_id: None }
    }

    fn with_request_id(mut self, request_id: &str) -> Self {
        self.request_id = Some(request_id.to_owned());
        self
    }

    fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

fn kind_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::GATEWAY_TIMEOUT => "timeout",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request_error",
    }
}

impl std::fmt::Display for OpenAiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for OpenAiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(id) = &self.request_id {
            response.insert_header((REQUEST_ID, id.as_str()));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.insert_header((actix_web::http::header::RETRY_AFTER, 1));
        }
        response.json(self.body())
    }
}

/// The ingest error's status and code, with the OpenAI parameter it concerns; an unknown model
/// is 404 `model_not_found`, as OpenAI answers.
impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        // OpenAI answers every refused field 400, where /v1/queries tells 400 from 422.
        let status = match e.status_code() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            status => status,
        };
        let (param, message) = match &e {
            ApiError::Invalid(SubmitError::UnknownModel { model, .. }) => return model_not_found(model),
            ApiError::Invalid(s) => param_of(s),
            _ => (None, e.to_string()),
        };
        Self::invalid(status, param, e.code(), message)
    }
}

impl From<SubmitError> for OpenAiError {
    fn from(e: SubmitError) -> Self {
        ApiError::from(e).into()
    }
}

/// A call to another service failed: its coded status in OpenAI's shape (the same code, a
/// matching HTTP status).
impl From<tonic::Status> for OpenAiError {
    fn from(status: tonic::Status) -> Self {
        let code = status
            .metadata()
            .get(millrace_proto::CODE_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("upstream_error")
            .to_owned();
        let http = match status.code() {
            tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            tonic::Code::Unavailable | tonic::Code::FailedPrecondition => StatusCode::SERVICE_UNAVAILABLE,
            tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = status.message().to_owned();
        Self::invalid(http, None, &code, message)
    }
}

/// A side service this deployment does not reach (its URL flag is empty).
pub(crate) fn not_configured(what: &str, flag: &str) -> OpenAiError {
    OpenAiError::invalid(
        StatusCode::SERVICE_UNAVAILABLE,
        None,
        "unavailable",
        format!("{what} is not available: ingest runs without {flag}"),
    )
}

pub(crate) fn model_not_found(model: &str) -> OpenAiError {
    OpenAiError::invalid(
        StatusCode::NOT_FOUND,
        Some("model"),
        "model_not_found",
        format!("The model `{model}` does not exist or you do not have access to it."),
    )
}

/// Which request field a validation error is about, and its message in OpenAI's terms.
fn param_of(e: &SubmitError) -> (Option<&'static str>, String) {
    let message = e.to_string().replace("max_new_tokens", "max_tokens").replace("`text`", "the last user message");
    let param = match e {
        SubmitError::EmptyText | SubmitError::TextTooLong { .. } | SubmitError::BadMessages(_) => Some("messages"),
        SubmitError::UnknownModel { .. } => Some("model"),
        SubmitError::BadIdentifier { field: "user" } => Some("user"),
        SubmitError::BadIdentifier { field: "session" } => Some("X-Session-Id"),
        SubmitError::BadIdentifier { field: "tenant" } => Some("X-Tenant"),
        SubmitError::BadIdempotencyKey(_) => Some("Idempotency-Key"),
        SubmitError::BadParams(p) => [
            "max_new_tokens",
            "temperature",
            "top_p",
            "stop",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "json_schema",
        ]
        .into_iter()
        .find(|name| p.contains(name))
        .map(|name| match name {
            "max_new_tokens" => "max_tokens",
            "json_schema" => "response_format",
            name => name,
        }),
        SubmitError::WrongType { field, .. } | SubmitError::UnknownField(field) => {
            CHAT_FIELDS.iter().copied().find(|f| f == field)
        }
        SubmitError::MissingField(field) => CHAT_FIELDS.iter().copied().find(|f| f == field),
        _ => None,
    };
    (param, message)
}

const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "user",
    "stream",
    "stream_options",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "tools",
    "tool_choice",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "ignore_eos",
];

/// Most alternatives `top_logprobs` may ask for (OpenAI's bound).
const MAX_TOP_LOGPROBS: u32 = 20;

/// Whether a parameter's value is its neutral one.
type IsNeutral = fn(&Value) -> bool;

/// OpenAI parameters this API does not implement yet, accepted only at their neutral value
/// (what OpenAI does when they are absent); any other value is refused with 400
/// `unsupported_parameter` rather than ignored.
const NEUTRAL_ONLY: &[(&str, IsNeutral)] = &[
    ("functions", |v| v.as_array().is_some_and(|a| a.is_empty())),
    ("function_call", |v| v.as_str() == Some("none")),
    ("parallel_tool_calls", |_| true),
    ("store", |v| v.as_bool() == Some(false)),
    ("metadata", |_| true),
];

/// A decoded chat request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    pub model: Option<String>,
    /// The last message's text: the user's new turn.
    pub text: String,
    /// The messages before it, oldest first, roles normalized (`developer` → `system`).
    pub earlier: Vec<ChatTurn>,
    pub user: Option<String>,
    pub sampling: Sampling,
    /// The answer is a call of one of the request's tools (its JSON is the completion).
    pub tool_call: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A decoded legacy completion request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TextRequest {
    pub model: Option<String>,
    pub prompt: String,
    pub user: Option<String>,
    pub sampling: Sampling,
}

/// Decodes `POST /v1/completions`: `prompt` a string (or an array of one), the sampling
/// parameters chat takes; `echo`, `suffix`, `best_of`, `logprobs` only at their defaults.
pub fn decode_text_completion(body: &[u8]) -> Result<TextRequest, OpenAiError> {
    let mut object = json_object(body)?;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Prompt {
        One(String),
        Many(Vec<String>),
    }
    let prompt = match take::<Prompt>(&mut object, "prompt")?.ok_or(SubmitError::MissingField("prompt"))? {
        Prompt::One(p) => p,
        Prompt::Many(mut p) if p.len() == 1 => p.remove(0),
        Prompt::Many(_) => {
            return Err(OpenAiError::invalid(
                StatusCode::BAD_REQUEST,
                Some("prompt"),
                "unsupported_parameter",
                "one prompt per request is supported",
            ));
        }
    };
    for (name, neutral) in [("echo", json!(false)), ("best_of", json!(1)), ("logprobs", json!(0))] {
        match object.remove(name) {
            None | Some(Value::Null) => {}
            Some(v) if v == neutral => {}
            Some(_) => {
                return Err(OpenAiError::invalid(
                    StatusCode::BAD_REQUEST,
                    None,
                    "unsupported_parameter",
                    format!("`{name}` is not supported by this server (only its default value is accepted)"),
                ));
            }
        }
    }
    if object.get("suffix").is_some_and(|v| !v.is_null()) {
        return Err(OpenAiError::invalid(
            StatusCode::BAD_REQUEST,
            Some("suffix"),
            "unsupported_parameter",
            "`suffix` is not supported",
        ));
    }
    object.remove("suffix");
    let sampling = sampling(&mut object)?;
    let request =
        TextRequest { model: take(&mut object, "model")?, prompt, user: take(&mut object, "user")?, sampling };
    refuse_the_rest(&object)?;
    Ok(request)
}

/// A JSON body's top-level object.
pub(crate) fn json_object(body: &[u8]) -> Result<Map<String, Value>, OpenAiError> {
    let text = std::str::from_utf8(body).map_err(|e| SubmitError::InvalidUtf8 { valid_up_to: e.valid_up_to() })?;
    let value: Value = serde_json::from_str(text).map_err(|e| SubmitError::MalformedJson(e.to_string()))?;
    match value {
        Value::Object(object) => Ok(object),
        _ => Err(SubmitError::WrongType { field: "(body)".into(), detail: "expected an object".into() }.into()),
    }
}

/// Refuses what is left of a body once every supported field was taken.
pub(crate) fn no_more_fields(object: &Map<String, Value>) -> Result<(), OpenAiError> {
    match object.keys().next() {
        Some(name) => Err(SubmitError::UnknownField(name.clone()).into()),
        None => Ok(()),
    }
}

/// A call over a list of texts (`/v1/embeddings`, `/v1/moderations`): its body's object with
/// the `input` texts (at most `max`) and the `model` taken out.
pub(crate) async fn texts_call(
    req: &HttpRequest,
    body: web::Payload,
    api: &HttpApi,
    max: usize,
) -> Result<(Map<String, Value>, Vec<String>, Option<String>), OpenAiError> {
    check_content_type(req)?;
    let mut object = json_object(&read_body(body, api.max_body_bytes).await?)?;
    let texts = text_inputs(&mut object, max)?;
    let model = take(&mut object, "model")?;
    Ok((object, texts, model))
}

/// OpenAI's `input` of embeddings and moderations: a string or an array of strings (token
/// arrays and images are refused), at most `max` of them, none empty.
pub(crate) fn text_inputs(object: &mut Map<String, Value>, max: usize) -> Result<Vec<String>, OpenAiError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Input {
        One(String),
        Many(Vec<String>),
    }
    let texts = match take::<Input>(object, "input")?.ok_or(SubmitError::MissingField("input"))? {
        Input::One(text) => vec![text],
        Input::Many(texts) => texts,
    };
    let refused =
        |message: String| OpenAiError::invalid(StatusCode::BAD_REQUEST, Some("input"), "invalid_input", message);
    if texts.is_empty() || texts.len() > max {
        return Err(refused(format!("`input` must hold 1..={max} texts, got {}", texts.len())));
    }
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return Err(refused(format!("input[{i}] is empty")));
    }
    Ok(texts)
}

/// Decodes OpenAI's chat request body (see the module docs for what is refused).
pub fn decode_chat(body: &[u8]) -> Result<ChatRequest, OpenAiError> {
    let mut object = json_object(body)?;
    let messages: Vec<Map<String, Value>> =
        take(&mut object, "messages")?.ok_or(SubmitError::MissingField("messages"))?;
    let (text, mut earlier) = conversation(&messages)?;
    let mut sampling = sampling(&mut object)?;
    let tools = tool_calling(&mut object)?;
    if let Some(calling) = &tools {
        if !sampling.params.json_schema.is_empty() {
            let message = "`response_format` and a required tool call cannot be combined";
            return Err(OpenAiError::invalid(
                StatusCode::BAD_REQUEST,
                Some("response_format"),
                "unsupported_parameter",
                message,
            ));
        }
        match calling.mode {
            CallMode::Required => sampling.params.json_schema = calling.schema.to_string(),
            // A call, or a plain answer that cannot be mistaken for one (it does not open with `{`).
            CallMode::Auto => {
                sampling.params.lark_grammar =
                    format!("start: call | answer\ncall: %json {}\nanswer: /[^{{](?s:.*)/", calling.schema)
            }
        }
        earlier.push(ChatTurn { role: "system".into(), content: calling.instructions.clone() });
    }
    let request = ChatRequest {
        model: take(&mut object, "model")?,
        text,
        earlier,
        user: take(&mut object, "user")?,
        sampling,
        tool_call: tools.is_some(),
    };
    refuse_the_rest(&object)?;
    Ok(request)
}

/// What chat and text completions both take: generation parameters, streaming, candidates.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sampling {
    pub params: GenerationParams,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage and no choices.
    pub include_usage: bool,
    /// Candidates to generate (`n`).
    pub n: u32,
    pub rerank: Option<Rerank>,
}

/// The Millrace extension `millrace_rerank`: order `n` candidates by the cosine similarity of
/// their embeddings to the conversation's (`true`) or to a given `{"reference": "…"}` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rerank {
    ByConversation,
    ByReference(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RerankField {
    On(bool),
    Reference { reference: String },
}

fn sampling(object: &mut Map<String, Value>) -> Result<Sampling, OpenAiError> {
    let refused = |param: &'static str, message: &str| {
        OpenAiError::invalid(StatusCode::BAD_REQUEST, Some(param), "unsupported_parameter", message)
    };
    let n = take::<u32>(object, "n")?.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(refused("n", &format!("n must be 1..={MAX_N}")));
    }
    let rerank = match take::<RerankField>(object, "millrace_rerank")? {
        None | Some(RerankField::On(false)) => None,
        Some(RerankField::On(true)) => Some(Rerank::ByConversation),
        Some(RerankField::Reference { reference }) => Some(Rerank::ByReference(reference)),
    };
    let max_tokens = match take::<u32>(object, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => take(object, "max_tokens")?,
    };
    let params = GenerationParams {
        max_new_tokens: max_tokens.unwrap_or_default(),
        temperature: take(object, "temperature")?,
        top_p: take(object, "top_p")?,
        top_k: 0,
        seed: take(object, "seed")?,
        stop: match take::<Stop>(object, "stop")? {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
        presence_penalty: take(object, "presence_penalty")?.unwrap_or_default(),
        frequency_penalty: take(object, "frequency_penalty")?.unwrap_or_default(),
        json_schema: response_format(object)?.unwrap_or_default(),
        lark_grammar: String::new(),
        logprobs: take(object, "logprobs")?.unwrap_or(false),
        top_logprobs: take(object, "top_logprobs")?.unwrap_or(0),
        logit_bias: logit_bias(object)?,
        // vLLM's extension: exactly max_tokens, past the end of sequence (benchmarks).
        ignore_eos: take(object, "ignore_eos")?.unwrap_or(false),
    };
    let stream = take(object, "stream")?.unwrap_or(false);
    if params.top_logprobs > MAX_TOP_LOGPROBS || (params.top_logprobs > 0 && !params.logprobs) {
        return Err(refused(
            "top_logprobs",
            &format!("top_logprobs must be 0..={MAX_TOP_LOGPROBS}, with logprobs true"),
        ));
    }
    if stream && params.logprobs {
        return Err(refused("logprobs", "logprobs are answered whole, not streamed"));
    }
    if stream && n > 1 {
        return Err(refused("n", "n > 1 is answered whole, not streamed"));
    }
    if rerank.is_some() && n < 2 {
        return Err(refused("millrace_rerank", "re-ranking needs n ≥ 2 candidates"));
    }
    Ok(Sampling {
        params,
        stream,
        include_usage: take::<StreamOptions>(object, "stream_options")?.is_some_and(|o| o.include_usage),
        n,
        rerank,
    })
}

/// Tool calling: the schema of `{"name", "arguments"}` over the allowed tools (their
/// `parameters` schemas), whether the answer must be a call, and the system message that tells
/// the model about them.
struct ToolCalling {
    schema: Value,
    mode: CallMode,
    instructions: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallMode {
    /// `"required"` or a named function: the answer is a call.
    Required,
    /// `"auto"` (the default with tools): a call or a plain answer, as the model chooses.
    Auto,
}

/// OpenAI's `tools`: with `tool_choice` `"required"` or a named function the answer is one
/// call, its arguments matching the function's `parameters` by constrained decoding; with
/// `"auto"` (the default with tools) a grammar lets the model answer with such a call or with
/// plain text; `"none"` (or no tools) is a plain answer.
fn tool_calling(object: &mut Map<String, Value>) -> Result<Option<ToolCalling>, OpenAiError> {
    #[derive(Deserialize)]
    struct Tool {
        r#type: String,
        function: Function,
    }
    #[derive(Deserialize)]
    struct Function {
        name: String,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        parameters: Option<Value>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Choice {
        Mode(String),
        Named { function: Named },
    }
    #[derive(Deserialize)]
    struct Named {
        name: String,
    }
    let bad = |param: &'static str, code: &str, message: String| {
        OpenAiError::invalid(StatusCode::BAD_REQUEST, Some(param), code, message)
    };
    let tools: Vec<Tool> = take(object, "tools")?.unwrap_or_default();
    let choice: Option<Choice> = take(object, "tool_choice")?;
    let has_choice = choice.is_some();
    let mode = match &choice {
        Some(Choice::Mode(mode)) if mode == "required" => CallMode::Required,
        Some(Choice::Named { .. }) => CallMode::Required,
        _ => CallMode::Auto,
    };
    let wanted = match choice {
        Some(Choice::Mode(mode)) if mode == "none" => return Ok(None),
        _ if tools.is_empty() => {
            return match has_choice {
                true => Err(bad("tool_choice", "invalid_value", "`tool_choice` needs `tools`".into())),
                false => Ok(None),
            };
        }
        Some(Choice::Mode(mode)) if mode == "required" || mode == "auto" => None,
        None => None,
        Some(Choice::Named { function }) => Some(function.name),
        Some(Choice::Mode(mode)) => {
            return Err(bad("tool_choice", "invalid_value", format!("unknown tool_choice {mode:?}")));
        }
    };
    if let Some(t) = tools.iter().find(|t| t.r#type != "function") {
        return Err(bad(
            "tools",
            "invalid_value",
            format!("tool type {:?} is not supported (only \"function\")", t.r#type),
        ));
    }
    let allowed: Vec<&Tool> = tools.iter().filter(|t| wanted.as_ref().is_none_or(|w| *w == t.function.name)).collect();
    if allowed.is_empty() {
        return Err(bad("tool_choice", "invalid_value", format!("no tool named {:?}", wanted.unwrap_or_default())));
    }
    let calls: Vec<Value> = allowed
        .iter()
        .map(|t| {
            let arguments = t.function.parameters.clone().unwrap_or_else(|| json!({ "type": "object" }));
            json!({
                "type": "object",
                "properties": { "name": { "const": t.function.name }, "arguments": arguments },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = if calls.len() == 1 { calls[0].clone() } else { json!({ "anyOf": calls }) };
    let described: Vec<Value> = allowed
        .iter()
        .map(|t| json!({ "name": t.function.name, "description": t.function.description, "parameters": t.function.parameters }))
        .collect();
    let how = match mode {
        CallMode::Required => "Answer by calling one of these functions",
        CallMode::Auto => "If one of these functions helps, answer only by calling it (otherwise answer normally)",
    };
    let instructions =
        format!("{how}, as a JSON object {{\"name\": ..., \"arguments\": {{...}}}}:\n{}", Value::Array(described));
    Ok(Some(ToolCalling { schema, mode, instructions }))
}

/// A tool call's completion (`{"name", "arguments"}`) as OpenAI's `tool_calls`; `None` when it
/// is not one (a `length` finish cut it short).
fn tool_calls(completion: &str, request_id: &str) -> Option<Value> {
    let call: Value = serde_json::from_str(completion).ok()?;
    let name = call.get("name")?.as_str()?;
    let arguments = call.get("arguments")?;
    Some(json!([{
        "id": format!("call_{}", request_id.replace('-', "")),
        "type": "function",
        "function": { "name": name, "arguments": arguments.to_string() },
    }]))
}

/// OpenAI's `logit_bias`: token ids (as JSON object keys) to biases.
fn logit_bias(object: &mut Map<String, Value>) -> Result<std::collections::HashMap<u32, f32>, OpenAiError> {
    let biases: std::collections::HashMap<String, f32> = take(object, "logit_bias")?.unwrap_or_default();
    biases
        .into_iter()
        .map(|(token, bias)| match token.parse() {
            Ok(token) => Ok((token, bias)),
            Err(_) => Err(OpenAiError::invalid(
                StatusCode::BAD_REQUEST,
                Some("logit_bias"),
                "invalid_value",
                format!("logit_bias keys are token ids, got {token:?}"),
            )),
        })
        .collect()
}

/// OpenAI's `response_format` as the JSON schema the output must match: `text` (none),
/// `json_object` (any object) or `json_schema` (`{"json_schema": {"name", "schema", "strict"}}`).
fn response_format(object: &mut Map<String, Value>) -> Result<Option<String>, OpenAiError> {
    #[derive(Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum ResponseFormat {
        Text,
        JsonObject,
        JsonSchema { json_schema: JsonSchema },
    }
    #[derive(Deserialize)]
    struct JsonSchema {
        #[serde(default)]
        schema: Option<Value>,
    }
    let bad = |message: String| {
        OpenAiError::invalid(StatusCode::BAD_REQUEST, Some("response_format"), "invalid_response_format", message)
    };
    let Some(value) = object.remove("response_format").filter(|v| !v.is_null()) else { return Ok(None) };
    let format: ResponseFormat = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    Ok(match format {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(r#"{"type":"object"}"#.to_owned()),
        ResponseFormat::JsonSchema { json_schema } => match json_schema.schema {
            Some(schema @ Value::Object(_)) => Some(schema.to_string()),
            Some(_) => return Err(bad("`json_schema.schema` must be a JSON schema object".into())),
            None => Some(r#"{"type":"object"}"#.to_owned()),
        },
    })
}

/// What is left of a body once every supported field was taken: a parameter at its neutral
/// value, or one this API does not do (refused, never ignored).
fn refuse_the_rest(object: &Map<String, Value>) -> Result<(), OpenAiError> {
    for (name, value) in object {
        match NEUTRAL_ONLY.iter().find(|(known, _)| known == name) {
            Some((_, neutral)) if value.is_null() || neutral(value) => {}
            Some((known, _)) => {
                return Err(OpenAiError::invalid(
                    StatusCode::BAD_REQUEST,
                    Some(known),
                    "unsupported_parameter",
                    format!("`{name}` is not supported by this server (only its default value is accepted)"),
                ));
            }
            None => return Err(SubmitError::UnknownField(name.clone()).into()),
        }
    }
    Ok(())
}

/// Removes and decodes `name`; absent and `null` both mean "not given".
pub(crate) fn take<T: DeserializeOwned>(object: &mut Map<String, Value>, name: &str) -> Result<Option<T>, SubmitError> {
    match object.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value)
            .map(Some)
            .map_err(|e| SubmitError::WrongType { field: name.to_owned(), detail: e.to_string() }),
    }
}

/// The conversation of a request: the last message, which must be the user's, and the ones
/// before it.
fn conversation(messages: &[Map<String, Value>]) -> Result<(String, Vec<ChatTurn>), OpenAiError> {
    let refused =
        |code: &str, message: String| OpenAiError::invalid(StatusCode::BAD_REQUEST, Some("messages"), code, message);
    let mut turns = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => "system",
                Some(role @ ("user" | "assistant")) => role,
                Some(other) => {
                    return Err(refused("unsupported_role", format!("messages[{i}]: role {other:?} is not supported")));
                }
                None => return Err(refused("missing_role", format!("messages[{i}] has no role"))),
            };
            Ok(ChatTurn { role: role.to_owned(), content: content_text(i, m.get("content"))? })
        })
        .collect::<Result<Vec<_>, _>>()?;
    match turns.pop() {
        Some(last) if last.role == "user" => Ok((last.content, turns)),
        _ => Err(refused("no_user_message", "`messages` must end with a message with role \"user\"".to_owned())),
    }
}

/// A message's content: a string, or the `text` parts of a content array.
fn content_text(index: usize, content: Option<&Value>) -> Result<String, OpenAiError> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => Ok(parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n")),
        None | Some(Value::Null) => Ok(String::new()),
        Some(_) => Err(SubmitError::WrongType {
            field: "messages".into(),
            detail: format!("messages[{index}]: content must be a string or an array of parts"),
        }
        .into()),
    }
}

/// How a terminal row answers a chat: a finish reason, or an error.
fn outcome(row: &ResultRow) -> Result<&'static str, OpenAiError> {
    let error = |status: StatusCode, fallback: &str| {
        let code = if row.reason.is_empty() { fallback } else { row.reason.as_str() };
        let message =
            if row.detail.is_empty() { format!("request {}: {code}", row.status.name()) } else { row.detail.clone() };
        Err(OpenAiError::invalid(status, None, code, message))
    };
    match row.status {
        TerminalStatus::Completed => Ok(if row.reason == "length" { "length" } else { "stop" }),
        TerminalStatus::BlockedInput | TerminalStatus::BlockedOutput => Ok("content_filter"),
        TerminalStatus::RateLimited => error(StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        TerminalStatus::Expired => error(StatusCode::GATEWAY_TIMEOUT, "expired"),
        TerminalStatus::Rejected => error(StatusCode::BAD_REQUEST, "rejected"),
        TerminalStatus::Cancelled => error(StatusCode::CONFLICT, "cancelled"),
        TerminalStatus::Failed | TerminalStatus::Unspecified => error(StatusCode::INTERNAL_SERVER_ERROR, "failed"),
    }
}

/// `GET /v1/models/{id}`: the model, or 404 `model_not_found`.
async fn model(id: web::Path<String>, api: web::Data<HttpApi>) -> Result<HttpResponse, OpenAiError> {
    let policy = api.frontend.gateway.policy();
    match policy.allowed_models.iter().find(|m| **m == *id) {
        Some(m) => Ok(HttpResponse::Ok().json(model_object(m))),
        None => Err(model_not_found(&id)),
    }
}

fn model_object(id: &str) -> Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": "millrace" })
}

async fn models(api: web::Data<HttpApi>) -> HttpResponse {
    let data: Vec<Value> = api.frontend.gateway.policy().allowed_models.iter().map(|m| model_object(m)).collect();
    HttpResponse::Ok().json(json!({ "object": "list", "data": data }))
}

async fn chat_completions(
    req: HttpRequest,
    body: web::Payload,
    api: web::Data<HttpApi>,
) -> Result<HttpResponse, OpenAiError> {
    let received_unix_us = now_unix_us();
    check_content_type(&req)?;
    let (tenant, idempotency_key) = tenant_and_key(&req)?;
    let session = header(&req, SESSION_ID).map_err(|_| SubmitError::BadIdentifier { field: "session" })?;
    let chat = decode_chat(&read_body(body, api.max_body_bytes).await?)?;
    let submission = Submission {
        tenant,
        idempotency_key,
        user: Some(chat.user.unwrap_or_else(|| DEFAULT_USER.to_owned())),
        // Without a session id the request's messages are the whole conversation.
        stateless: session.is_none(),
        session,
        text: Some(chat.text),
        messages: chat.earlier,
        model: chat.model,
        params: chat.sampling.params,
        deadline_ms: Some(i64::from(deadline_ms(&api))),
        ..Default::default()
    };
    let reference = rerank_reference(chat.sampling.rerank, || {
        let earlier = submission.messages.iter().map(|m| m.content.as_str());
        earlier.chain(submission.text.as_deref()).collect::<Vec<_>>().join("\n")
    });
    let shape = Shape {
        flavor: Flavor::Chat,
        stream: chat.sampling.stream,
        include_usage: chat.sampling.include_usage,
        n: chat.sampling.n,
        reference,
        tool_call: chat.tool_call,
    };
    complete(&api, submission, shape, received_unix_us).await
}

/// `POST /v1/completions`: a plain prompt, continued as it is (no chat template, no history).
async fn completions(
    req: HttpRequest,
    body: web::Payload,
    api: web::Data<HttpApi>,
) -> Result<HttpResponse, OpenAiError> {
    let received_unix_us = now_unix_us();
    check_content_type(&req)?;
    let (tenant, idempotency_key) = tenant_and_key(&req)?;
    let text = decode_text_completion(&read_body(body, api.max_body_bytes).await?)?;
    let submission = Submission {
        tenant,
        idempotency_key,
        user: Some(text.user.unwrap_or_else(|| DEFAULT_USER.to_owned())),
        stateless: true,
        raw_prompt: true,
        text: Some(text.prompt),
        model: text.model,
        params: text.sampling.params,
        deadline_ms: Some(i64::from(deadline_ms(&api))),
        ..Default::default()
    };
    let reference = rerank_reference(text.sampling.rerank, || submission.text.clone().unwrap_or_default());
    let shape = Shape {
        flavor: Flavor::Text,
        stream: text.sampling.stream,
        include_usage: text.sampling.include_usage,
        n: text.sampling.n,
        reference,
        tool_call: false,
    };
    complete(&api, submission, shape, received_unix_us).await
}

fn tenant_and_key(req: &HttpRequest) -> Result<(Option<String>, Option<String>), SubmitError> {
    let idempotency_key =
        header(req, IDEMPOTENCY_KEY).map_err(|_| SubmitError::BadIdempotencyKey("must be visible ASCII".into()))?;
    Ok((tenant(req)?, idempotency_key))
}

fn deadline_ms(api: &HttpApi) -> u32 {
    CHAT_DEADLINE_MS.min(api.frontend.gateway.policy().max_deadline_ms)
}

/// Which OpenAI API answers, and how.
#[derive(Debug, Clone)]
struct Shape {
    flavor: Flavor,
    stream: bool,
    include_usage: bool,
    /// Candidates to generate.
    n: u32,
    /// The text candidates are re-ranked against, when asked.
    reference: Option<String>,
    /// The answer is a tool call.
    tool_call: bool,
}

/// The text to re-rank against: the given reference, or the request's conversation.
fn rerank_reference(rerank: Option<Rerank>, conversation: impl FnOnce() -> String) -> Option<String> {
    rerank.map(|r| match r {
        Rerank::ByConversation => conversation(),
        Rerank::ByReference(reference) => reference,
    })
}

/// Submits, follows the request to its end and answers in the flavor's shape: one body, or a
/// stream of chunks.
async fn complete(
    api: &HttpApi,
    submission: Submission,
    shape: Shape,
    received_unix_us: i64,
) -> Result<HttpResponse, OpenAiError> {
    // `n` candidates are `n` sibling requests submitted together (so the batcher batches them),
    // each moderated on its own; a seed or an idempotency key is varied per candidate.
    let mut followers = Vec::with_capacity(shape.n as usize);
    for i in 0..shape.n {
        let mut candidate = submission.clone();
        if i > 0 {
            candidate.params.seed = candidate.params.seed.map(|seed| seed.wrapping_add(u64::from(i)));
            candidate.idempotency_key = candidate.idempotency_key.map(|key| format!("{key}#{i}"));
        }
        followers.push(api.frontend.submit_and_follow(candidate, received_unix_us).await?);
    }
    let (accepted, _) = &followers[0];
    let request_id = accepted.request_id.clone();
    let meta = Meta {
        id: format!("{}{request_id}", shape.flavor.id_prefix()),
        created: received_unix_us / 1_000_000,
        model: accepted.model.clone(),
        include_usage: shape.include_usage,
        flavor: shape.flavor,
        tool_call: shape.tool_call,
    };
    if shape.stream {
        let (_, follower) = followers.pop().expect("one candidate when streaming");
        return Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header((REQUEST_ID, request_id.as_str()))
            .insert_header(("cache-control", "no-cache"))
            .streaming(stream_completion(follower, meta)));
    }
    let ids: Vec<String> = followers.iter().map(|(a, _)| a.request_id.clone()).collect();
    let rows = futures::future::join_all(followers.into_iter().map(|(_, follower)| finished_row(follower))).await;
    let rows: Vec<ResultRow> =
        rows.into_iter().collect::<Result<_, _>>().map_err(|e| OpenAiError::from(e).with_request_id(&request_id))?;
    let mut choices = Vec::with_capacity(rows.len());
    for (row, id) in rows.iter().zip(&ids) {
        let finish_reason = outcome(row).map_err(|e| e.with_request_id(&request_id))?;
        let calls = meta.tool_call.then(|| tool_calls(&row.completion, id)).flatten();
        if let Some(calls) = calls.filter(|_| finish_reason == "stop") {
            choices.push(json!({
                "message": { "role": "assistant", "content": null, "tool_calls": calls },
                "logprobs": null,
                "finish_reason": "tool_calls",
            }));
            continue;
        }
        choices.push(match meta.flavor {
            Flavor::Chat => json!({
                "message": { "role": "assistant", "content": row.completion },
                "logprobs": chat_logprobs(row),
                "finish_reason": finish_reason,
            }),
            Flavor::Text => json!({ "text": row.completion, "logprobs": null, "finish_reason": finish_reason }),
        });
    }
    if let Some(reference) = &shape.reference {
        let scores = rerank_scores(api, reference, &rows).await?;
        let mut scored: Vec<(f32, Value)> = scores.into_iter().zip(choices).collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        choices = scored
            .into_iter()
            .map(|(score, mut choice)| {
                choice["millrace_score"] = json!(score);
                choice
            })
            .collect();
    }
    for (index, choice) in choices.iter_mut().enumerate() {
        choice["index"] = json!(index);
    }
    let completion_tokens: u32 = rows.iter().map(|r| r.completion_tokens).sum();
    let mut body = json!({
        "id": meta.id,
        "object": meta.flavor.object(),
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(&rows[0], completion_tokens),
    });
    if ids.len() > 1 {
        body["millrace_request_ids"] = json!(ids);
    }
    Ok(HttpResponse::Ok().insert_header((REQUEST_ID, request_id.as_str())).json(body))
}

/// OpenAI's `logprobs` of a chat choice: per token its text, log probability, UTF-8 bytes and
/// the top alternatives; `null` when the request did not ask (or nothing was generated).
fn chat_logprobs(row: &ResultRow) -> Value {
    if row.logprobs.is_empty() {
        return Value::Null;
    }
    let entry = |token: &str, logprob: f32| json!({ "token": token, "logprob": logprob, "bytes": token.as_bytes() });
    let content: Vec<Value> = row
        .logprobs
        .iter()
        .map(|t| {
            let mut e = entry(&t.token, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|a| entry(&a.token, a.logprob)).collect();
            e
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// A followed request's terminal row, the text in between skipped.
async fn finished_row(mut follower: Follower) -> Result<ResultRow, ApiError> {
    loop {
        match follower.next().await {
            Some(Ok(Event::Finished(row))) => return Ok(*row),
            Some(Ok(Event::Text(_))) => {}
            Some(Err(e)) => return Err(e),
            None => unreachable!("a follower ends with its result or an error"),
        }
    }
}

/// Each candidate's cosine similarity to `reference`, from inference's encoder (one batch).
async fn rerank_scores(api: &HttpApi, reference: &str, rows: &[ResultRow]) -> Result<Vec<f32>, OpenAiError> {
    let mut inference =
        api.frontend.inference.clone().ok_or_else(|| not_configured("millrace_rerank", "--inference-url"))?;
    let texts = std::iter::once(reference.to_owned()).chain(rows.iter().map(|r| r.completion.clone())).collect();
    let request = millrace_proto::v1::EmbedRequest { texts, ..Default::default() };
    let embedded = inference.embed(request).await?.into_inner();
    // The embeddings are L2-normalized: a dot product is their cosine.
    match embedded.embeddings.split_first() {
        Some((reference, candidates)) if candidates.len() == rows.len() => {
            Ok(candidates.iter().map(|c| c.values.iter().zip(&reference.values).map(|(a, b)| a * b).sum()).collect())
        }
        _ => Err(OpenAiError::invalid(
            StatusCode::BAD_GATEWAY,
            Some("millrace_rerank"),
            "upstream_error",
            format!("inference embedded {} of {} texts", embedded.embeddings.len(), rows.len() + 1),
        )),
    }
}

/// Chat completions or legacy text completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Chat,
    Text,
}

impl Flavor {
    fn id_prefix(self) -> &'static str {
        match self {
            Self::Chat => "chatcmpl-",
            Self::Text => "cmpl-",
        }
    }

    fn object(self) -> &'static str {
        match self {
            Self::Chat => "chat.completion",
            Self::Text => "text_completion",
        }
    }

    fn chunk_object(self) -> &'static str {
        match self {
            Self::Chat => "chat.completion.chunk",
            Self::Text => "text_completion",
        }
    }
}

/// What every chunk of one completion repeats.
struct Meta {
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    flavor: Flavor,
    /// A tool call streams as one `tool_calls` delta once the call is whole.
    tool_call: bool,
}

/// OpenAI's `usage`: the prompt's counts from `prompt`'s row (the candidates share one prompt),
/// `completion_tokens` over all candidates. `prompt_tokens_details.cached_tokens`
/// counts the prompt tokens whose KV came from the replica's prefix cache; a Millrace extension
/// says how many of the earlier messages the token budget left out.
fn usage(prompt: &ResultRow, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt.prompt_tokens + completion_tokens,
        "prompt_tokens_details": { "cached_tokens": prompt.prompt_tokens_cached },
        "millrace_trimmed_messages": prompt.turns_dropped,
    })
}

impl Meta {
    /// The last chunk of a stream asked for with `include_usage`: no choices, the usage.
    fn usage_chunk(&self, row: &ResultRow) -> Bytes {
        self.chunk_with(json!([]), Some(usage(row, row.completion_tokens)))
    }

    /// A chat stream opens with the assistant's role; a text stream with its first text.
    fn opening(&self) -> Option<Bytes> {
        (self.flavor == Flavor::Chat).then(|| self.choice_chunk(json!({ "role": "assistant", "content": "" }), None))
    }

    fn text_chunk(&self, text: String) -> Bytes {
        match self.flavor {
            Flavor::Chat => self.choice_chunk(json!({ "content": text }), None),
            Flavor::Text => self.choice_chunk(json!(text), None),
        }
    }

    fn finish_chunk(&self, finish_reason: &str) -> Bytes {
        match self.flavor {
            Flavor::Chat => self.choice_chunk(json!({}), Some(finish_reason)),
            Flavor::Text => self.choice_chunk(json!(""), Some(finish_reason)),
        }
    }

    /// One choice: a chat `delta`, or a text completion's `text`.
    fn choice_chunk(&self, content: Value, finish_reason: Option<&str>) -> Bytes {
        let key = if self.flavor == Flavor::Chat { "delta" } else { "text" };
        let choice = json!({ "index": 0, key: content, "logprobs": null, "finish_reason": finish_reason });
        self.chunk_with(json!([choice]), None)
    }

    fn chunk_with(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let mut chunk = json!({
            "id": self.id,
            "object": self.flavor.chunk_object(),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        event(&chunk)
    }
}

fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// One stream's events: a chat's role chunk, the text as it is released, then the outcome
/// (and the usage, when asked for) and `[DONE]`. The follower lives inside the stream, so a
/// client that goes away (actix drops the stream) cancels its request.
fn stream_completion(follower: Follower, meta: Meta) -> impl futures::Stream<Item = Result<Bytes, actix_web::Error>> {
    enum State {
        Following(Box<Follower>),
        Finish(&'static str, Box<ResultRow>),
        Usage(Box<ResultRow>),
        Done,
        End,
    }
    let opening = futures::stream::iter(meta.opening().map(Ok::<_, actix_web::Error>));
    let rest = futures::stream::unfold((State::Following(Box::new(follower)), meta), |(state, meta)| async move {
        let (bytes, next) = match state {
            State::Following(mut follower) => match next_event(&mut follower, meta.tool_call).await {
                Some(Ok(Event::Text(text))) => (meta.text_chunk(text), State::Following(follower)),
                Some(Ok(Event::Finished(row))) => match outcome(&row) {
                    Ok("stop") if meta.tool_call => match tool_calls(&row.completion, follower.request_id()) {
                        Some(calls) => (
                            meta.choice_chunk(json!({ "tool_calls": indexed(calls) }), None),
                            State::Finish("tool_calls", row),
                        ),
                        None => (meta.text_chunk(row.completion.clone()), State::Finish("stop", row)),
                    },
                    Ok(finish_reason) if meta.tool_call => {
                        (meta.text_chunk(row.completion.clone()), State::Finish(finish_reason, row))
                    }
                    Ok(finish_reason) => (meta.finish_chunk(finish_reason), after_finish(&meta, row)),
                    Err(e) => (event(&e.body()), State::Done),
                },
                Some(Err(e)) => (event(&OpenAiError::from(e).body()), State::Done),
                None => (Bytes::from_static(DONE), State::End),
            },
            State::Finish(finish_reason, row) => (meta.finish_chunk(finish_reason), after_finish(&meta, row)),
            State::Usage(row) => (meta.usage_chunk(&row), State::Done),
            State::Done => (Bytes::from_static(DONE), State::End),
            State::End => return None,
        };
        Some((Ok(bytes), (next, meta)))
    });
    fn after_finish(meta: &Meta, row: Box<ResultRow>) -> State {
        if meta.include_usage { State::Usage(row) } else { State::Done }
    }
    futures::StreamExt::chain(opening, rest)
}

/// The follower's next event; a tool call's text is not streamed piece by piece (it is sent as
/// one call when whole), so its pieces are skipped.
async fn next_event(follower: &mut Follower, tool_call: bool) -> Option<Result<Event, ApiError>> {
    loop {
        match follower.next().await {
            Some(Ok(Event::Text(_))) if tool_call => continue,
            other => return other,
        }
    }
}

/// Tool calls as a stream delta names them: each with its `index`.
fn indexed(mut calls: Value) -> Value {
    if let Some(calls) = calls.as_array_mut() {
        for (index, call) in calls.iter_mut().enumerate() {
            call["index"] = json!(index);
        }
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_user_message_is_the_text() {
        let chat = decode_chat(
            br#"{"model":"m","messages":[{"role":"system","content":"be nice"},{"role":"user","content":"hi"},
                {"role":"assistant","content":"hello"},{"role":"user","content":[{"type":"text","text":"again"}]}],
                "temperature":0.5,"top_p":0.9,"max_tokens":12,"stop":"\n","seed":3,"user":"bob","stream":true,
                "stream_options":{"include_usage":true},"n":1}"#,
        )
        .unwrap();
        assert_eq!(chat.text, "again");
        assert_eq!((chat.model.as_deref(), chat.user.as_deref(), chat.sampling.stream), (Some("m"), Some("bob"), true));
        assert_eq!(
            chat.sampling.params,
            GenerationParams {
                max_new_tokens: 12,
                temperature: Some(0.5),
                top_p: Some(0.9),
                top_k: 0,
                seed: Some(3),
                stop: vec!["\n".into()],
                ..Default::default()
            }
        );
        assert!(chat.sampling.include_usage);
        let chat = decode_chat(br#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b"]}"#).unwrap();
        assert_eq!(chat.sampling.params.stop, ["a", "b"]);
        assert!(!chat.sampling.stream && !chat.sampling.include_usage && !chat.sampling.params.ignore_eos);
        let chat = decode_chat(br#"{"messages":[{"role":"user","content":"x"}],"ignore_eos":true}"#).unwrap();
        assert!(chat.sampling.params.ignore_eos, "vLLM's extension is honoured");
    }

    #[test]
    fn parameters_not_implemented_are_refused_unless_neutral() {
        let with = |extra: &str| {
            decode_chat(format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{extra}}}"#).as_bytes())
        };
        for neutral in [
            r#""presence_penalty":0"#,
            r#""logprobs":false"#,
            r#""response_format":{"type":"text"}"#,
            r#""tools":[]"#,
            r#""metadata":{"a":"b"}"#,
            r#""frequency_penalty":null"#,
        ] {
            assert!(with(neutral).is_ok(), "{neutral}");
        }
        for (refused, param) in [
            (r#""functions":[{"name":"f"}]"#, "functions"),
            (r#""logprobs":true,"stream":true"#, "logprobs"),
            (r#""top_logprobs":3"#, "top_logprobs"),
        ] {
            let e = with(refused).unwrap_err();
            assert_eq!(
                (e.status, e.param, e.code.as_str()),
                (StatusCode::BAD_REQUEST, Some(param), "unsupported_parameter"),
                "{refused}"
            );
        }
        let e = with(r#""temprature":1"#).unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (StatusCode::BAD_REQUEST, "unknown_field"));
    }

    #[test]
    fn a_required_tool_call_is_a_schema_over_the_tools_and_auto_is_refused() {
        let with = |extra: &str| {
            decode_chat(
                format!(
                    r#"{{"messages":[{{"role":"user","content":"weather?"}}],"tools":[
                    {{"type":"function","function":{{"name":"weather","parameters":{{"type":"object","properties":{{"city":{{"type":"string"}}}}}}}}}},
                    {{"type":"function","function":{{"name":"time"}}}}]{extra}}}"#
                )
                .as_bytes(),
            )
        };
        let chat = with(r#","tool_choice":"required""#).unwrap();
        assert!(chat.tool_call);
        let schema: Value = serde_json::from_str(&chat.sampling.params.json_schema).unwrap();
        assert_eq!(schema["anyOf"].as_array().unwrap().len(), 2);
        assert_eq!(chat.earlier.last().unwrap().role, "system", "the model is told about the tools");
        let named = with(r#","tool_choice":{"type":"function","function":{"name":"weather"}}"#).unwrap();
        let schema: Value = serde_json::from_str(&named.sampling.params.json_schema).unwrap();
        assert_eq!(schema["properties"]["name"]["const"], "weather");
        assert!(!with(r#","tool_choice":"none""#).unwrap().tool_call);
        for auto in ["", r#","tool_choice":"auto""#] {
            let chat = with(auto).unwrap();
            assert!(chat.tool_call && chat.sampling.params.json_schema.is_empty(), "{auto}");
            assert!(chat.sampling.params.lark_grammar.starts_with("start: call | answer"), "{auto}");
        }
        let e = with(r#","tool_choice":{"type":"function","function":{"name":"nope"}}"#).unwrap_err();
        assert_eq!((e.param, e.code.as_str()), (Some("tool_choice"), "invalid_value"));
        let calls = tool_calls(r#"{"name":"weather","arguments":{"city":"Oslo"}}"#, "0190-ab").unwrap();
        assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Oslo"}"#);
        assert!(tool_calls("{\"name\":", "r").is_none());
    }

    #[test]
    fn response_formats_become_json_schemas() {
        let with = |format: &str| {
            decode_chat(
                format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"response_format":{format}}}"#).as_bytes(),
            )
        };
        assert_eq!(with(r#"{"type":"text"}"#).unwrap().sampling.params.json_schema, "");
        assert_eq!(with(r#"{"type":"json_object"}"#).unwrap().sampling.params.json_schema, r#"{"type":"object"}"#);
        let schema =
            with(r#"{"type":"json_schema","json_schema":{"name":"p","schema":{"type":"object","required":["a"]}}}"#);
        let schema: Value = serde_json::from_str(&schema.unwrap().sampling.params.json_schema).unwrap();
        assert_eq!(schema, json!({ "type": "object", "required": ["a"] }));
        for bad in [r#"{"type":"yaml"}"#, r#"{"type":"json_schema","json_schema":{"schema":3}}"#] {
            let e = with(bad).unwrap_err();
            assert_eq!((e.param, e.code.as_str()), (Some("response_format"), "invalid_response_format"), "{bad}");
        }
    }

    #[test]
    fn bad_requests_name_their_param() {
        let err = |body: &str| decode_chat(body.as_bytes()).unwrap_err();
        let e = err(r#"{"messages":[]}"#);
        assert_eq!(
            (e.status, e.param, e.code.as_str()),
            (StatusCode::BAD_REQUEST, Some("messages"), "no_user_message")
        );
        let e = err(r#"{"model":"m"}"#);
        assert_eq!((e.param, e.code.as_str()), (Some("messages"), "missing_field"));
        let e = err(r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#);
        assert_eq!((e.param, e.code.as_str()), (Some("temperature"), "wrong_type"));
        let e = err(r#"{"messages":[{"role":"user","content":"x"}],"n":9}"#);
        assert_eq!(e.param, Some("n"));
        let e = err(r#"{"messages":[{"role":"user","content":"x"}],"millrace_rerank":true}"#);
        assert_eq!(e.param, Some("millrace_rerank"), "re-ranking one candidate");
        assert_eq!(err("{").code, "malformed_json");
        let body = OpenAiError::from(SubmitError::BadParams("max_new_tokens must be at most 5, got 9".into())).body();
        assert_eq!(body["error"]["param"], "max_tokens");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["message"], "bad params: max_tokens must be at most 5, got 9");
    }

    #[test]
    fn rows_map_to_finish_reasons_or_errors() {
        let row = |status: &str, reason: &str| ResultRow {
            status: TerminalStatus::parse(status).unwrap(),
            reason: reason.into(),
            ..Default::default()
        };
        assert_eq!(outcome(&row("COMPLETED", "eos")).unwrap(), "stop");
        assert_eq!(outcome(&row("COMPLETED", "length")).unwrap(), "length");
        assert_eq!(outcome(&row("BLOCKED_OUTPUT", "toxicity")).unwrap(), "content_filter");
        assert_eq!(outcome(&row("BLOCKED_INPUT", "")).unwrap(), "content_filter");
        let e = outcome(&row("RATE_LIMITED", "")).unwrap_err();
        assert_eq!(
            (e.status, e.kind, e.code.as_str()),
            (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "rate_limited")
        );
        assert_eq!(outcome(&row("EXPIRED", "")).unwrap_err().status, StatusCode::GATEWAY_TIMEOUT);
        let e = outcome(&row("REJECTED", "prompt_too_long")).unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (StatusCode::BAD_REQUEST, "prompt_too_long"));
        assert_eq!(outcome(&row("FAILED", "x")).unwrap_err().kind, "server_error");
    }

    #[test]
    fn usage_reports_the_cached_prompt_tokens_and_the_trimmed_messages() {
        let row = ResultRow {
            prompt_tokens: 12,
            prompt_tokens_cached: 8,
            completion_tokens: 5,
            turns_dropped: 2,
            ..Default::default()
        };
        let expected = json!({
            "prompt_tokens": 12,
            "completion_tokens": 7,
            "total_tokens": 19,
            "prompt_tokens_details": { "cached_tokens": 8 },
            "millrace_trimmed_messages": 2,
        });
        assert_eq!(usage(&row, 7), expected);
        let meta = Meta {
            id: "chatcmpl-r1".into(),
            created: 1,
            model: "m".into(),
            include_usage: true,
            flavor: Flavor::Chat,
            tool_call: false,
        };
        let chunk = meta.usage_chunk(&row);
        let chunk: Value =
            serde_json::from_slice(chunk.strip_prefix(b"data: ").unwrap().strip_suffix(b"\n\n").unwrap()).unwrap();
        assert_eq!(chunk["choices"], json!([]));
        assert_eq!(chunk["usage"]["prompt_tokens_details"]["cached_tokens"], 8);
        assert_eq!(chunk["usage"]["total_tokens"], 17);
    }
}
