//! Decoding the JSON body of `POST /v1/queries` into a [`Submission`].
//!
//! The body is read in steps — UTF-8, then JSON syntax, then each known field by its type — so
//! each failure gets its own error class and names the field at fault. (serde's derived
//! `Deserialize` would fold missing, unknown and mistyped fields into one opaque error.)
use millrace_proto::v1::{ChatTurn, GenerationParams};
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};

use crate::submit::{Submission, SubmitError};

/// Decodes a body already known to be within the size limit. Tenant and idempotency key come
/// from headers, so they are left unset.
pub fn decode_submission(body: &[u8]) -> Result<Submission, SubmitError> {
    let text = std::str::from_utf8(body).map_err(|e| SubmitError::InvalidUtf8 { valid_up_to: e.valid_up_to() })?;
    let value: Value = serde_json::from_str(text).map_err(|e| SubmitError::MalformedJson(e.to_string()))?;
    submission_from_json(value, None)
}

/// Decodes a submit already parsed as JSON; `path` names where it sits in a larger document
/// (a WebSocket frame's `query`), for error messages.
pub fn submission_from_json(value: Value, path: Option<&'static str>) -> Result<Submission, SubmitError> {
    let mut fields = Fields::new(value, path)?;
    let submission = Submission {
        user: fields.take("user")?,
        session: fields.take("session")?,
        text: fields.take("text")?,
        model: fields.take("model")?,
        params: fields.take("params")?.map(decode_params).transpose()?.unwrap_or_default(),
        deadline_ms: fields.take("deadline_ms")?.map(deadline_ms).transpose()?,
        priority: fields.take("priority")?.unwrap_or_default(),
        messages: fields
            .take::<Vec<Turn>>("messages")?
            .unwrap_or_default()
            .into_iter()
            .map(Turn::into_chat_turn)
            .collect(),
        stateless: fields.take("stateless")?.unwrap_or_default(),
        ..Default::default()
    };
    fields.finish()?;
    Ok(submission)
}

/// One of `messages`: `{"role", "content"}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Turn {
    role: String,
    content: String,
}

impl Turn {
    fn into_chat_turn(self) -> ChatTurn {
        ChatTurn { role: self.role, content: self.content }
    }
}

fn decode_params(value: Value) -> Result<GenerationParams, SubmitError> {
    let mut fields = Fields::new(value, Some("params"))?;
    let params = GenerationParams {
        max_new_tokens: fields.take("max_new_tokens")?.unwrap_or_default(),
        temperature: fields.take("temperature")?,
        top_p: fields.take("top_p")?,
        top_k: fields.take("top_k")?.unwrap_or_default(),
        seed: fields.take("seed")?,
        stop: fields.take("stop")?.unwrap_or_default(),
        presence_penalty: fields.take("presence_penalty")?.unwrap_or_default(),
        frequency_penalty: fields.take("frequency_penalty")?.unwrap_or_default(),
        // A JSON schema object the output must match (constrained decoding).
        // Per-token log probabilities are answered by the OpenAI API only.
        logprobs: false,
        top_logprobs: 0,
        logit_bias: Default::default(),
        lark_grammar: String::new(),
        json_schema: fields
            .take::<Map<String, Value>>("json_schema")?
            .map(|s| Value::Object(s).to_string())
            .unwrap_or_default(),
        // Exactly max_new_tokens, past the end of sequence (benchmarks).
        ignore_eos: fields.take("ignore_eos")?.unwrap_or_default(),
    };
    fields.finish()?;
    Ok(params)
}

/// Any JSON number is the right type for a deadline; one that is not an integer is a bad
/// deadline (range checks follow in validation).
fn deadline_ms(n: Number) -> Result<i64, SubmitError> {
    n.as_i64()
        .ok_or_else(|| SubmitError::BadDeadline(format!("must be a positive whole number of milliseconds, got {n}")))
}

/// A JSON object read one known field at a time; whatever no one asked for is unknown.
struct Fields {
    object: Map<String, Value>,
    /// Where the object sits in the body (`None` = the body itself), for error messages.
    path: Option<&'static str>,
}

impl Fields {
    fn new(value: Value, path: Option<&'static str>) -> Result<Self, SubmitError> {
        match value {
            Value::Object(object) => Ok(Self { object, path }),
            other => Err(SubmitError::WrongType {
                field: path.unwrap_or("(body)").to_owned(),
                detail: format!("expected an object, got {}", kind(&other)),
            }),
        }
    }

    /// Removes and decodes `name`; absent and `null` both mean "not given".
    fn take<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, SubmitError> {
        match self.object.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => serde_json::from_value(value)
                .map(Some)
                .map_err(|e| SubmitError::WrongType { field: self.qualified(name), detail: e.to_string() }),
        }
    }

    /// Refuses the first field no `take` asked for: a typo is reported, not silently ignored.
    fn finish(self) -> Result<(), SubmitError> {
        match self.object.keys().next() {
            Some(name) => Err(SubmitError::UnknownField(self.qualified(name))),
            None => Ok(()),
        }
    }

    fn qualified(&self, name: &str) -> String {
        match self.path {
            Some(path) => format!("{path}.{name}"),
            None => name.to_owned(),
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> &'static str {
        decode_submission(body.as_bytes()).expect_err(body).code()
    }

    #[test]
    fn a_full_body_decodes() {
        let s = decode_submission(
            br#"{"user":"u","session":"s","text":"hi","model":"m","deadline_ms":1500,"priority":-2,
                "params":{"max_new_tokens":8,"temperature":0.5,"top_p":1,"top_k":3,"seed":7,"stop":["x"],
                "ignore_eos":true}}"#,
        )
        .unwrap();
        assert_eq!(
            s,
            Submission {
                user: Some("u".into()),
                session: Some("s".into()),
                text: Some("hi".into()),
                model: Some("m".into()),
                deadline_ms: Some(1500),
                priority: -2,
                params: GenerationParams {
                    max_new_tokens: 8,
                    temperature: Some(0.5),
                    top_p: Some(1.0),
                    top_k: 3,
                    seed: Some(7),
                    stop: vec!["x".into()],
                    ignore_eos: true,
                    ..Default::default()
                },
                ..Default::default()
            }
        );
    }

    #[test]
    fn null_and_absent_mean_not_given() {
        let s = decode_submission(br#"{"user":"u","text":"t","model":null,"params":null}"#).unwrap();
        assert_eq!((s.model, s.params), (None, GenerationParams::default()));
    }

    #[test]
    fn each_decoding_failure_has_its_class() {
        assert_eq!(decode_submission(b"{\"user\":\"\xff\"}").unwrap_err(), SubmitError::InvalidUtf8 { valid_up_to: 9 });
        for (body, expected) in [
            ("", "malformed_json"),
            ("{\"user\":", "malformed_json"),
            ("[1]", "wrong_type"),
            (r#"{"user":5,"text":"t"}"#, "wrong_type"),
            (r#"{"user":"u","text":["t"]}"#, "wrong_type"),
            (r#"{"user":"u","text":"t","params":[]}"#, "wrong_type"),
            (r#"{"user":"u","text":"t","params":{"temperature":"hot"}}"#, "wrong_type"),
            (r#"{"user":"u","text":"t","params":{"max_new_tokens":-1}}"#, "wrong_type"),
            (r#"{"user":"u","text":"t","priority":1.5}"#, "wrong_type"),
            (r#"{"user":"u","text":"t","deadline_ms":"soon"}"#, "wrong_type"),
            (r#"{"user":"u","text":"t","deadline_ms":1.5}"#, "bad_deadline"),
            (r#"{"user":"u","text":"t","usr":"typo"}"#, "unknown_field"),
            (r#"{"user":"u","text":"t","params":{"temp":1}}"#, "unknown_field"),
        ] {
            assert_eq!(code(body), expected, "{body}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = decode_submission(br#"{"user":"u","text":"t","params":{"top_k":"x"}}"#).unwrap_err();
        assert!(e.to_string().starts_with("`params.top_k` has the wrong type"), "{e}");
        let e = decode_submission(br#"{"user":"u","text":"t","params":{"topk":1}}"#).unwrap_err();
        assert_eq!(e, SubmitError::UnknownField("params.topk".into()));
    }
}
