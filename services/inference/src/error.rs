//! Every way an `Inference` call can fail, mapped once to a machine-readable code and a gRPC
//! status code; the code leads the status message (`"empty_prompt: ..."`) and rides in
//! `x-millrace-code` metadata, as ingest's errors do.
use millrace_engine::EngineError;
use millrace_proto::ErrorClass;
use tracing::error;

use crate::request::Rejection;

/// gRPC metadata key carrying the machine-readable code (the same key ingest uses).
/// Most texts one `Embed` or `Classify` call may send.
pub const MAX_TEXTS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("give either a prompt or chat messages, not both")]
    PromptAndMessages,
    #[error("model {0:?} has no chat template: send a ready prompt")]
    NoChatTemplate(String),
    #[error("chat messages: {0}")]
    Messages(#[source] EngineError),
    #[error("give at least one text")]
    NoTexts,
    #[error("at most {MAX_TEXTS} texts per call, got {0}")]
    TooManyTexts(usize),
    #[error("{0} are disabled on this server")]
    Disabled(&'static str),
    #[error("{waiting} requests wait for admission, as many as can run at once ({running} running); retry shortly")]
    Overloaded { waiting: usize, running: usize },
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("engine job: {0}")]
    Internal(String),
}

impl ApiError {
    fn class(&self) -> (&'static str, ErrorClass) {
        use ErrorClass as C;
        match self {
            Self::Rejected(r) => (r.code(), C::Unprocessable),
            Self::PromptAndMessages => ("prompt_and_messages", C::BadRequest),
            Self::NoChatTemplate(_) => ("no_chat_template", C::FailedPrecondition),
            Self::Messages(_) => ("invalid_messages", C::BadRequest),
            Self::NoTexts => ("empty_texts", C::Unprocessable),
            Self::TooManyTexts(_) => ("too_many_texts", C::Unprocessable),
            Self::Disabled(_) => ("model_disabled", C::FailedPrecondition),
            Self::Overloaded { .. } => ("overloaded", C::Overloaded),
            Self::Engine(_) => ("engine", C::Internal),
            Self::Internal(_) => ("internal", C::Internal),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let (code, class) = e.class();
        if class == ErrorClass::Internal {
            error!(error = %e, "inference call failed");
        }
        millrace_proto::coded_status(class, code, &e)
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn statuses_carry_the_code_in_message_and_metadata() {
        let status = tonic::Status::from(ApiError::from(Rejection::EmptyPrompt));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("empty_prompt: "), "{}", status.message());
        assert_eq!(status.metadata().get(millrace_proto::CODE_METADATA).unwrap(), "empty_prompt");
        assert_eq!(
            tonic::Status::from(ApiError::Overloaded { waiting: 2, running: 2 }).code(),
            Code::ResourceExhausted
        );
        assert_eq!(tonic::Status::from(ApiError::TooManyTexts(300)).code(), Code::InvalidArgument);
    }
}
