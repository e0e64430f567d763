//! gRPC `millrace.v1.Moderation`: `Check` one text against the policy in force, outside the
//! mesh. Errors carry a machine-readable code (`empty_text: …`, also in `x-millrace-code`).
use millrace_proto::ErrorClass;
use millrace_proto::v1::moderation_server::Moderation;
use millrace_proto::v1::{CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};
use tracing::error;

use crate::moderator::{ModerationError, Moderator};
use crate::policy::Stage;

/// Longest text `Check` takes, bytes.
pub const MAX_TEXT_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("give a text to check")]
    EmptyText,
    #[error("text is {0} bytes; at most {MAX_TEXT_BYTES}")]
    TextTooLong(usize),
    #[error("stage {0:?} is neither \"input\" nor \"output\"")]
    UnknownStage(String),
    #[error(transparent)]
    Moderation(#[from] ModerationError),
}

impl ApiError {
    fn class(&self) -> (&'static str, ErrorClass) {
        match self {
            Self::EmptyText => ("empty_text", ErrorClass::Unprocessable),
            Self::TextTooLong(_) => ("text_too_long", ErrorClass::Unprocessable),
            Self::UnknownStage(_) => ("unknown_stage", ErrorClass::BadRequest),
            Self::Moderation(_) => ("internal", ErrorClass::Internal),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let (code, class) = e.class();
        if class == ErrorClass::Internal {
            error!(error = %e, "moderation check failed");
        }
        millrace_proto::coded_status(class, code, &e)
    }
}

/// Validates a request: the text and its stage.
pub fn validate(request: &CheckRequest) -> Result<Stage, ApiError> {
    let stage = Stage::parse(&request.stage).ok_or_else(|| ApiError::UnknownStage(request.stage.clone()))?;
    if request.text.trim().is_empty() {
        return Err(ApiError::EmptyText);
    }
    if request.text.len() > MAX_TEXT_BYTES {
        return Err(ApiError::TextTooLong(request.text.len()));
    }
    Ok(stage)
}

pub struct ModerationApi {
    pub moderator: Moderator,
}

#[tonic::async_trait]
impl Moderation for ModerationApi {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        let stage = validate(&request)?;
        let (decision, _) = self.moderator.check(request.text, stage).await.map_err(ApiError::from)?;
        Ok(Response::new(CheckResponse {
            action: decision.action.as_str().to_owned(),
            verdicts: decision.verdicts,
            policy_version: decision.policy_version,
        }))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn request(text: &str, stage: &str) -> CheckRequest {
        CheckRequest { text: text.into(), stage: stage.into() }
    }

    #[test]
    fn requests_are_validated_with_coded_statuses() {
        assert_eq!(validate(&request("hi", "input")).unwrap(), Stage::Input);
        assert_eq!(validate(&request("hi", "output")).unwrap(), Stage::Output);
        let status = Status::from(validate(&request("  ", "input")).unwrap_err());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("empty_text: "), "{}", status.message());
        assert_eq!(status.metadata().get(millrace_proto::CODE_METADATA).unwrap(), "empty_text");
        let status = Status::from(validate(&request("hi", "")).unwrap_err());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.metadata().get(millrace_proto::CODE_METADATA).unwrap(), "unknown_stage");
        let long = "a".repeat(MAX_TEXT_BYTES + 1);
        assert_eq!(Status::from(validate(&request(&long, "input")).unwrap_err()).code(), Code::InvalidArgument);
    }
}
