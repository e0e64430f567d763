//! A request's terminal outcome as one flat row: what the sink stores and serves, and what
//! ingest hands to clients that follow a request to its end.
use serde::{Deserialize, Serialize};

use crate::v1::{DlqRecord, Result as TerminalResult, ResultRecord, StageTiming, TerminalStatus, Timings, Verdict};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ResultRow {
    pub request_id: String,
    pub tenant: String,
    pub user: String,
    pub session: String,
    pub model: String,
    pub model_version: String,
    /// Serialised as its upper-case name (`COMPLETED`, `FAILED`, …), as the API and the
    /// database show it; an enum everywhere inside.
    #[serde(with = "status_name")]
    pub status: TerminalStatus,
    pub reason: String,
    pub detail: String,
    /// The stage that ended the request.
    pub stage: String,
    pub prompt: String,
    pub completion: String,
    pub verdicts: Vec<Verdict>,
    pub timings: Vec<StageTiming>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Units of the earlier conversation trimmed to fit the token budget.
    pub turns_dropped: u32,
    /// Of `prompt_tokens`, how many had their KV taken from the inference replica's prefix
    /// cache instead of being computed.
    pub prompt_tokens_cached: u32,
    /// Per completion token, when the request asked; answered live, not stored by the sink.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<crate::v1::TokenLogprob>,
    pub accepted_unix_ms: i64,
    /// When the sink stored the row; 0 for a result read straight off the bus.
    pub stored_unix_ms: i64,
}

/// Why a message cannot become a row.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InvalidResult {
    #[error("result has no request id")]
    MissingRequestId,
    #[error("result has no terminal status")]
    MissingStatus,
}

impl InvalidResult {
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingRequestId => "missing_request_id",
            Self::MissingStatus => "missing_status",
        }
    }
}

impl ResultRow {
    pub fn from_result(result: TerminalResult, stored_unix_ms: i64) -> Result<Self, InvalidResult> {
        let ctx = result.ctx.unwrap_or_default();
        if ctx.request_id.is_empty() {
            return Err(InvalidResult::MissingRequestId);
        }
        let status = match TerminalStatus::try_from(result.status) {
            Ok(TerminalStatus::Unspecified) | Err(_) => return Err(InvalidResult::MissingStatus),
            Ok(status) => status,
        };
        Ok(Self {
            request_id: ctx.request_id,
            tenant: ctx.tenant,
            user: ctx.user,
            session: ctx.session,
            model: ctx.model,
            model_version: result.model_version,
            status,
            reason: result.reason,
            detail: result.detail,
            stage: result.stage,
            prompt: result.prompt,
            completion: result.completion,
            verdicts: result.verdicts,
            timings: result.timings.unwrap_or_default().stages,
            prompt_tokens: result.prompt_tokens,
            turns_dropped: result.turns_dropped,
            prompt_tokens_cached: result.prompt_tokens_cached,
            logprobs: result.logprobs,
            completion_tokens: result.completion_tokens,
            accepted_unix_ms: ctx.accepted_unix_ms,
            stored_unix_ms,
        })
    }

    /// The FAILED row a dead letter stands for, when no other terminal row got there first.
    pub fn failed_from_dead_letter(record: &DlqRecord, stored_unix_ms: i64) -> Self {
        let ctx = record.ctx.clone().unwrap_or_default();
        Self {
            request_id: record.request_id.clone(),
            tenant: ctx.tenant,
            user: ctx.user,
            session: ctx.session,
            model: ctx.model,
            model_version: String::new(),
            status: TerminalStatus::Failed,
            reason: record.reason.clone(),
            detail: record.detail.clone(),
            stage: record.stage.clone(),
            prompt: String::new(),
            completion: String::new(),
            verdicts: Vec::new(),
            timings: Vec::new(),
            prompt_tokens: 0,
            turns_dropped: 0,
            prompt_tokens_cached: 0,
            logprobs: Vec::new(),
            completion_tokens: 0,
            accepted_unix_ms: ctx.accepted_unix_ms,
            stored_unix_ms,
        }
    }

    pub fn into_record(self) -> ResultRecord {
        ResultRecord {
            status: self.status.into(),
            request_id: self.request_id,
            tenant: self.tenant,
            user: self.user,
            session: self.session,
            model: self.model,
            model_version: self.model_version,
            reason: self.reason,
            detail: self.detail,
            prompt: self.prompt,
            completion: self.completion,
            verdicts: self.verdicts,
            prompt_tokens: self.prompt_tokens,
            turns_dropped: self.turns_dropped,
            prompt_tokens_cached: self.prompt_tokens_cached,
            completion_tokens: self.completion_tokens,
            timings: Some(Timings { stages: self.timings }),
            accepted_unix_ms: self.accepted_unix_ms,
            stored_unix_ms: self.stored_unix_ms,
            stage: self.stage,
        }
    }
}

/// A terminal status as its upper-case name at the JSON edge (`#[serde(with = …)]`).
pub mod status_name {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    use crate::v1::TerminalStatus;

    pub fn serialize<S: Serializer>(status: &TerminalStatus, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(status.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TerminalStatus, D::Error> {
        let name = String::deserialize(d)?;
        TerminalStatus::parse(&name).ok_or_else(|| D::Error::custom(format!("unknown terminal status {name:?}")))
    }
}

#[cfg(test)]
mod tests {
    use crate::v1::RequestContext;

    use super::*;

    fn result(request_id: &str, status: TerminalStatus) -> TerminalResult {
        TerminalResult {
            ctx: Some(RequestContext { request_id: request_id.into(), user: "u1".into(), ..Default::default() }),
            status: status as i32,
            completion: "Paris".into(),
            prompt_tokens: 9,
            prompt_tokens_cached: 8,
            timings: Some(Timings {
                stages: vec![StageTiming { stage: "ingest".into(), received_unix_us: 1, finished_unix_us: 2 }],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_result_becomes_a_row_and_a_record() {
        let row = ResultRow::from_result(result("r1", TerminalStatus::Completed), 7).unwrap();
        assert_eq!((row.status, row.user.as_str(), row.stored_unix_ms), (TerminalStatus::Completed, "u1", 7));
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["status"], "COMPLETED");
        assert_eq!((json["prompt_tokens"].as_u64(), json["prompt_tokens_cached"].as_u64()), (Some(9), Some(8)));
        assert_eq!(serde_json::from_value::<ResultRow>(json).unwrap(), row);
        let before = serde_json::json!({ "status": "COMPLETED", "prompt_tokens": 9 });
        assert_eq!(serde_json::from_value::<ResultRow>(before).unwrap().prompt_tokens_cached, 0, "a row without it");
        let unknown = serde_json::json!({ "status": "DONE" });
        assert!(serde_json::from_value::<ResultRow>(unknown).unwrap_err().to_string().contains("DONE"));
        let record = row.into_record();
        assert_eq!(record.status, TerminalStatus::Completed as i32);
        assert_eq!((record.prompt_tokens, record.prompt_tokens_cached), (9, 8));
        assert_eq!(record.timings.unwrap().stages.len(), 1);
    }

    #[test]
    fn results_without_id_or_status_are_invalid() {
        assert_eq!(
            ResultRow::from_result(result("", TerminalStatus::Completed), 0),
            Err(InvalidResult::MissingRequestId)
        );
        assert_eq!(
            ResultRow::from_result(result("r", TerminalStatus::Unspecified), 0),
            Err(InvalidResult::MissingStatus)
        );
    }
}
