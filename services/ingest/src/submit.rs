//! Turning a client's submit into the `Query` ingest publishes: every check a submit must pass,
//! with one error variant per class of bad input (docs/architecture.md, "Invariants": bad input
//! gets a specific error).
//!
//! Pure apart from the clock read by the UUIDv7 id and the timing record: no NATS, no I/O.
use actix_web::http::StatusCode;
use millrace_proto::ErrorClass;
use millrace_proto::v1::{ChatTurn, GenerationParams, Query, RequestContext, Timings};
use uuid::Uuid;

use crate::config::SubmitPolicy;

/// The stage name in timings and in `Nats-Msg-Id`s.
pub const STAGE: &str = "ingest";

/// Longest user, session or tenant name, in characters.
const MAX_IDENTIFIER_CHARS: usize = 128;
/// Longest `Idempotency-Key`, in characters.
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;
const MAX_STOP_SEQUENCES: usize = 8;
const MAX_STOP_CHARS: usize = 64;
/// Most tokens `logit_bias` may name (OpenAI's bound).
const MAX_LOGIT_BIAS: usize = 300;
/// Longest JSON schema a request may constrain its output with.
const MAX_SCHEMA_BYTES: usize = 16 * 1024;
/// Session of a request that names none.
const DEFAULT_SESSION: &str = "default";

/// Namespace of the UUIDv5 request ids derived from (tenant, idempotency key). Fixed forever:
/// changing it would give a retry across the change a new id.
const IDEMPOTENCY_NAMESPACE: Uuid = uuid::uuid!("6f1c0e8a-3d5b-4c1e-9a7f-2b8d4e6a1c35");

/// A submit as a client sent it, before any check. Both APIs decode into this; `None` means
/// "not given" (for gRPC, the proto3 zero value). Parameters keep the proto's convention: zero
/// means "service default".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Submission {
    pub tenant: Option<String>,
    pub idempotency_key: Option<String>,
    pub user: Option<String>,
    pub session: Option<String>,
    pub text: Option<String>,
    pub model: Option<String>,
    pub params: GenerationParams,
    /// Relative deadline, milliseconds. Signed so a negative one is reported as a bad deadline,
    /// not as a type error.
    pub deadline_ms: Option<i64>,
    pub priority: i32,
    /// The messages before `text`, oldest first (OpenAI's `messages`; empty elsewhere).
    pub messages: Vec<ChatTurn>,
    /// No server-side history: the prompt is `messages` + `text` alone and no conversation is
    /// read or written (`session` must then be absent).
    pub stateless: bool,
    /// `text` is the whole prompt, continued as it is: no chat template, no history
    /// (OpenAI's legacy completions).
    pub raw_prompt: bool,
}

/// Why a submit was refused. Each variant is one class of bad input with its own stable code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("`{field}` has the wrong type: {detail}")]
    WrongType { field: String, detail: String },
    #[error("`{0}` is required")]
    MissingField(&'static str),
    #[error("unknown field `{0}`")]
    UnknownField(String),
    #[error("`text` is empty or only whitespace")]
    EmptyText,
    #[error("`text` has {chars} characters; at most {max} are accepted")]
    TextTooLong { chars: usize, max: usize },
    #[error("the body is not valid UTF-8 (first bad byte at offset {valid_up_to})")]
    InvalidUtf8 { valid_up_to: usize },
    #[error("unknown model {model:?}; allowed: {}", allowed.join(", "))]
    UnknownModel { model: String, allowed: Vec<String> },
    #[error("the body is larger than {max} bytes")]
    BodyTooLarge { max: usize },
    /// The body could not be received whole (a truncated upload, a broken connection).
    #[error("the body could not be read: {0}")]
    UnreadableBody(String),
    #[error("bad deadline_ms: {0}")]
    BadDeadline(String),
    #[error("bad params: {0}")]
    BadParams(String),
    #[error("content type must be application/json, got {0:?}")]
    UnsupportedMediaType(String),
    #[error("bad Idempotency-Key: {0}")]
    BadIdempotencyKey(String),
    #[error("`{field}` must be 1..={MAX_IDENTIFIER_CHARS} characters")]
    BadIdentifier { field: &'static str },
    #[error("bad messages: {0}")]
    BadMessages(String),
    #[error("a stateless request names no session")]
    SessionWithStateless,
}

impl SubmitError {
    /// Each refusal's machine-readable code and class (see [`ErrorClass`]): 400 = the request
    /// could not be read; 422 = it was read but its content is refused.
    pub fn class(&self) -> (&'static str, ErrorClass) {
        use ErrorClass as C;
        match self {
            Self::MalformedJson(_) => ("malformed_json", C::BadRequest),
            Self::WrongType { .. } => ("wrong_type", C::BadRequest),
            Self::MissingField(_) => ("missing_field", C::BadRequest),
            Self::UnknownField(_) => ("unknown_field", C::BadRequest),
            Self::EmptyText => ("empty_text", C::Unprocessable),
            Self::TextTooLong { .. } => ("text_too_long", C::Unprocessable),
            Self::InvalidUtf8 { .. } => ("invalid_utf8", C::BadRequest),
            Self::UnknownModel { .. } => ("unknown_model", C::Unprocessable),
            Self::BodyTooLarge { .. } => ("body_too_large", C::PayloadTooLarge),
            Self::UnreadableBody(_) => ("unreadable_body", C::BadRequest),
            Self::BadDeadline(_) => ("bad_deadline", C::Unprocessable),
            Self::BadParams(_) => ("bad_params", C::Unprocessable),
            Self::UnsupportedMediaType(_) => ("unsupported_media_type", C::UnsupportedMediaType),
            Self::BadIdempotencyKey(_) => ("bad_idempotency_key", C::BadRequest),
            Self::BadIdentifier { .. } => ("bad_identifier", C::Unprocessable),
            Self::BadMessages(_) => ("bad_messages", C::Unprocessable),
            Self::SessionWithStateless => ("session_and_stateless", C::Unprocessable),
        }
    }

    pub fn code(&self) -> &'static str {
        self.class().0
    }

    pub fn http_status(&self) -> StatusCode {
        StatusCode::from_u16(self.class().1.http_status()).expect("the class table holds valid statuses")
    }
}

impl Submission {
    /// Checks the submit against `policy` and builds the `Query` to publish, stamped as received
    /// at `received_unix_us`. The request id is a UUIDv7, or with an idempotency key a UUIDv5 of
    /// (tenant, key), so a retried submit is the same request.
    pub fn into_query(self, policy: &SubmitPolicy, received_unix_us: i64) -> Result<Query, SubmitError> {
        let user = self.user.ok_or(SubmitError::MissingField("user"))?;
        check_identifier("user", &user)?;
        let text = self.text.ok_or(SubmitError::MissingField("text"))?;
        check_text(&text, policy.max_text_chars)?;
        let session = match (self.stateless, self.session) {
            (true, Some(_)) => return Err(SubmitError::SessionWithStateless),
            (true, None) => String::new(),
            (false, session) => session.unwrap_or_else(|| DEFAULT_SESSION.to_owned()),
        };
        if !self.stateless {
            check_identifier("session", &session)?;
        }
        check_messages(&self.messages, policy.max_text_chars)?;
        let tenant = self.tenant.unwrap_or_else(|| policy.default_tenant.clone());
        check_identifier("tenant", &tenant)?;
        if let Some(key) = &self.idempotency_key {
            check_idempotency_key(key)?;
        }
        let model = choose_model(self.model, &policy.allowed_models)?;
        check_params(&self.params, policy.max_new_tokens)?;
        let deadline_ms = check_deadline(self.deadline_ms, policy)?;

        let request_id = request_id(&tenant, self.idempotency_key.as_deref()).to_string();
        let accepted_unix_ms = received_unix_us / 1000;
        let mut timings = Timings::default();
        timings.record(STAGE, received_unix_us);
        Ok(Query {
            ctx: Some(RequestContext {
                request_id,
                tenant,
                user,
                session,
                model,
                deadline_unix_ms: accepted_unix_ms + deadline_ms,
                params: Some(self.params),
                accepted_unix_ms,
                priority: self.priority,
                stateless: self.stateless,
                raw_prompt: self.raw_prompt,
            }),
            timings: Some(timings),
            text,
            messages: self.messages,
        })
    }
}

/// A fresh UUIDv7 (time-ordered, so ids sort by arrival), or the UUIDv5 of (tenant, key).
fn request_id(tenant: &str, idempotency_key: Option<&str>) -> Uuid {
    match idempotency_key {
        // Length-prefixing the tenant keeps ("ab", "c") and ("a", "bc") apart.
        Some(key) => {
            let name = [&(tenant.len() as u64).to_be_bytes(), tenant.as_bytes(), key.as_bytes()].concat();
            Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, &name)
        }
        None => Uuid::now_v7(),
    }
}

/// Whether `request_id` was derived from an idempotency key (the UUIDv5 of [`request_id`]).
pub fn is_keyed(request_id: &str) -> bool {
    Uuid::parse_str(request_id).is_ok_and(|id| id.get_version_num() == 5)
}

fn check_identifier(field: &'static str, value: &str) -> Result<(), SubmitError> {
    if (1..=MAX_IDENTIFIER_CHARS).contains(&value.chars().count()) {
        Ok(())
    } else {
        Err(SubmitError::BadIdentifier { field })
    }
}

fn check_text(text: &str, max_chars: usize) -> Result<(), SubmitError> {
    if text.trim().is_empty() {
        return Err(SubmitError::EmptyText);
    }
    let chars = text.chars().count();
    if chars > max_chars {
        return Err(SubmitError::TextTooLong { chars, max: max_chars });
    }
    Ok(())
}

fn check_idempotency_key(key: &str) -> Result<(), SubmitError> {
    let chars = key.chars().count();
    if (1..=MAX_IDEMPOTENCY_KEY_CHARS).contains(&chars) {
        Ok(())
    } else {
        Err(SubmitError::BadIdempotencyKey(format!("must be 1..={MAX_IDEMPOTENCY_KEY_CHARS} characters, got {chars}")))
    }
}

fn choose_model(model: Option<String>, allowed: &[String]) -> Result<String, SubmitError> {
    match model {
        None => Ok(allowed.first().cloned().unwrap_or_default()),
        Some(m) if allowed.contains(&m) => Ok(m),
        Some(model) => Err(SubmitError::UnknownModel { model, allowed: allowed.to_vec() }),
    }
}

fn check_params(p: &GenerationParams, max_new_tokens: u32) -> Result<(), SubmitError> {
    let problem = if p.max_new_tokens > max_new_tokens {
        format!("max_new_tokens must be at most {max_new_tokens}, got {}", p.max_new_tokens)
    } else if let Some(t) = p.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        // Written as "not in range" so NaN (possible over gRPC) is refused too.
        format!("temperature must be within [0, 2] (0 = greedy), got {t}")
    } else if let Some(t) = p.top_p.filter(|t| !(*t > 0.0 && *t <= 1.0)) {
        format!("top_p must be within (0, 1], got {t}")
    } else if !(-2.0..=2.0).contains(&p.presence_penalty) {
        format!("presence_penalty must be within [-2, 2], got {}", p.presence_penalty)
    } else if !(-2.0..=2.0).contains(&p.frequency_penalty) {
        format!("frequency_penalty must be within [-2, 2], got {}", p.frequency_penalty)
    } else if let Some((token, bias)) = p.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(*b)) {
        format!("logit_bias of token {token} must be within [-100, 100], got {bias}")
    } else if p.logit_bias.len() > MAX_LOGIT_BIAS {
        format!("at most {MAX_LOGIT_BIAS} logit_bias entries, got {}", p.logit_bias.len())
    } else if p.json_schema.len() > MAX_SCHEMA_BYTES {
        format!("json_schema must be at most {MAX_SCHEMA_BYTES} bytes, got {}", p.json_schema.len())
    } else if p.stop.len() > MAX_STOP_SEQUENCES {
        format!("at most {MAX_STOP_SEQUENCES} stop sequences, got {}", p.stop.len())
    } else if p.stop.iter().any(|s| s.is_empty() || s.chars().count() > MAX_STOP_CHARS) {
        format!("each stop sequence must be 1..={MAX_STOP_CHARS} characters")
    } else {
        return Ok(());
    };
    Err(SubmitError::BadParams(problem))
}

/// The roles a conversation's messages may have.
pub const CHAT_ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Earlier messages: known roles, and no more text in all of them than a text may have times
/// the number of messages (each is a turn of its own; the token budget trims them later).
fn check_messages(messages: &[ChatTurn], max_chars: usize) -> Result<(), SubmitError> {
    if let Some((i, m)) = messages.iter().enumerate().find(|(_, m)| !CHAT_ROLES.contains(&m.role.as_str())) {
        return Err(SubmitError::BadMessages(format!("messages[{i}]: role {:?} is not one of {CHAT_ROLES:?}", m.role)));
    }
    if let Some((i, m)) = messages.iter().enumerate().find(|(_, m)| m.content.chars().count() > max_chars) {
        let chars = m.content.chars().count();
        return Err(SubmitError::BadMessages(format!("messages[{i}] has {chars} characters; at most {max_chars}")));
    }
    Ok(())
}

fn check_deadline(deadline_ms: Option<i64>, policy: &SubmitPolicy) -> Result<i64, SubmitError> {
    let max = i64::from(policy.max_deadline_ms);
    match deadline_ms {
        None => Ok(i64::from(policy.default_deadline_ms)),
        Some(d) if (1..=max).contains(&d) => Ok(d),
        Some(d) => Err(SubmitError::BadDeadline(format!("must be 1..={max} milliseconds, got {d}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SubmitPolicy {
        SubmitPolicy {
            allowed_models: vec!["m1".into(), "m2".into()],
            max_text_chars: 10,
            max_new_tokens: 100,
            default_deadline_ms: 1_000,
            max_deadline_ms: 5_000,
            default_tenant: "t0".into(),
        }
    }

    fn valid() -> Submission {
        Submission { user: Some("alice".into()), text: Some("hello".into()), ..Default::default() }
    }

    fn refused(s: Submission) -> SubmitError {
        s.into_query(&policy(), 1_000_000).expect_err("should be refused")
    }

    #[test]
    fn a_minimal_submit_gets_the_defaults() {
        let q = valid().into_query(&policy(), 7_000_123).unwrap();
        let ctx = q.ctx.unwrap();
        assert_eq!(Uuid::parse_str(&ctx.request_id).unwrap().get_version_num(), 7);
        assert_eq!((ctx.tenant.as_str(), ctx.user.as_str(), ctx.session.as_str()), ("t0", "alice", DEFAULT_SESSION));
        assert_eq!(ctx.model, "m1");
        assert_eq!(ctx.accepted_unix_ms, 7_000);
        assert_eq!(ctx.deadline_unix_ms, 8_000);
        assert_eq!(q.text, "hello");
        let stages = q.timings.unwrap().stages;
        assert_eq!(stages.len(), 1);
        assert_eq!((stages[0].stage.as_str(), stages[0].received_unix_us), (STAGE, 7_000_123));
    }

    #[test]
    fn everything_given_is_carried() {
        let params = GenerationParams {
            max_new_tokens: 50,
            temperature: Some(0.7),
            top_p: Some(0.9),
            top_k: 40,
            seed: Some(42),
            stop: vec!["\n\n".into()],
            ..Default::default()
        };
        let s = Submission {
            tenant: Some("acme".into()),
            session: Some("s1".into()),
            model: Some("m2".into()),
            params: params.clone(),
            deadline_ms: Some(5_000),
            priority: 3,
            ..valid()
        };
        let ctx = s.into_query(&policy(), 1_000_000).unwrap().ctx.unwrap();
        assert_eq!((ctx.tenant.as_str(), ctx.session.as_str(), ctx.model.as_str()), ("acme", "s1", "m2"));
        assert_eq!(ctx.params, Some(params));
        assert_eq!(ctx.deadline_unix_ms, 1_000 + 5_000);
        assert_eq!(ctx.priority, 3);
    }

    #[test]
    fn an_idempotency_key_gives_the_same_id_per_tenant() {
        let with = |tenant: &str, key: &str| {
            let s = Submission { tenant: Some(tenant.into()), idempotency_key: Some(key.into()), ..valid() };
            s.into_query(&policy(), 1_000_000).unwrap().ctx.unwrap().request_id
        };
        let id = with("acme", "k1");
        assert_eq!(Uuid::parse_str(&id).unwrap().get_version_num(), 5);
        assert_eq!(id, with("acme", "k1"));
        assert_ne!(id, with("acme", "k2"));
        assert_ne!(id, with("other", "k1"));
        assert_ne!(with("ab", "c"), with("a", "bc"));
        let fresh = || valid().into_query(&policy(), 0).unwrap().ctx.unwrap().request_id;
        assert_ne!(fresh(), fresh(), "without a key every submit is a new request");
        assert!(is_keyed(&id) && !is_keyed(&fresh()));
    }

    #[test]
    fn each_bad_input_has_its_class() {
        let cases: Vec<(Submission, &str)> = vec![
            (Submission { user: None, ..valid() }, "missing_field"),
            (Submission { text: None, ..valid() }, "missing_field"),
            (Submission { text: Some(String::new()), ..valid() }, "empty_text"),
            (Submission { text: Some(" \n\t ".into()), ..valid() }, "empty_text"),
            (Submission { text: Some("x".repeat(11)), ..valid() }, "text_too_long"),
            (Submission { model: Some("gpt-9".into()), ..valid() }, "unknown_model"),
            (Submission { model: Some(String::new()), ..valid() }, "unknown_model"),
            (Submission { deadline_ms: Some(0), ..valid() }, "bad_deadline"),
            (Submission { deadline_ms: Some(-5), ..valid() }, "bad_deadline"),
            (Submission { deadline_ms: Some(5_001), ..valid() }, "bad_deadline"),
            (Submission { user: Some(String::new()), ..valid() }, "bad_identifier"),
            (Submission { user: Some("u".repeat(129)), ..valid() }, "bad_identifier"),
            (Submission { session: Some(String::new()), ..valid() }, "bad_identifier"),
            (Submission { tenant: Some(String::new()), ..valid() }, "bad_identifier"),
            (Submission { idempotency_key: Some(String::new()), ..valid() }, "bad_idempotency_key"),
            (Submission { idempotency_key: Some("k".repeat(201)), ..valid() }, "bad_idempotency_key"),
        ];
        for (s, code) in cases {
            assert_eq!(refused(s.clone()).code(), code, "{s:?}");
        }
    }

    #[test]
    fn parameters_out_of_range_are_bad_params() {
        let bad = [
            GenerationParams { max_new_tokens: 101, ..Default::default() },
            GenerationParams { temperature: Some(-0.1), ..Default::default() },
            GenerationParams { temperature: Some(2.01), ..Default::default() },
            GenerationParams { temperature: Some(f32::NAN), ..Default::default() },
            GenerationParams { top_p: Some(1.5), ..Default::default() },
            GenerationParams { top_p: Some(-0.5), ..Default::default() },
            GenerationParams { stop: vec!["s".into(); 9], ..Default::default() },
            GenerationParams { stop: vec![String::new()], ..Default::default() },
            GenerationParams { stop: vec!["s".repeat(65)], ..Default::default() },
        ];
        for params in bad {
            let e = refused(Submission { params: params.clone(), ..valid() });
            assert!(matches!(e, SubmitError::BadParams(_)), "{params:?}: {e}");
        }
        let edges =
            GenerationParams { max_new_tokens: 100, temperature: Some(2.0), top_p: Some(1.0), ..Default::default() };
        assert!(Submission { params: edges, ..valid() }.into_query(&policy(), 0).is_ok());
    }

    #[test]
    fn text_length_counts_characters_not_bytes() {
        let ten_wide_chars = Submission { text: Some("é".repeat(10)), ..valid() };
        assert!(ten_wide_chars.into_query(&policy(), 0).is_ok());
    }

    #[test]
    fn codes_and_statuses() {
        assert_eq!(SubmitError::EmptyText.code(), "empty_text");
        assert_eq!(SubmitError::EmptyText.http_status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(SubmitError::BodyTooLarge { max: 1 }.http_status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(SubmitError::UnsupportedMediaType("text/plain".into()).http_status().as_u16(), 415);
        assert_eq!(SubmitError::MalformedJson("x".into()).http_status(), StatusCode::BAD_REQUEST);
    }
}
