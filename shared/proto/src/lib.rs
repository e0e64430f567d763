//! The Millrace contracts (`proto/millrace/v1`), generated at build time, plus small helpers
//! every stage needs on them.

// Generated code: clippy's advice is for the generator, not for us.
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("millrace.v1");
}

pub mod deadline;
pub mod row;

/// The encoded `FileDescriptorSet` of every Millrace contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/millrace_descriptor.bin"));

pub use prost::Message;
use v1::{RequestContext, StageTiming, TerminalStatus, Timings};

impl RequestContext {
    /// Whether the request continues a stored conversation (and so is stored in it): not when
    /// it is stateless or a raw prompt.
    pub fn keeps_history(&self) -> bool {
        !self.stateless && !self.raw_prompt
    }
}

/// A message that belongs to one request and carries its [`RequestContext`] as field 1 (`ctx`),
/// so any stage, the DLQ and the sink can read the context without knowing the message's type
/// (see `Envelope`). `Batch` is the one edge message that does not: it carries many requests'
/// prompts, each with its own context; `DlqRecord` keeps the dead message's context beside it.
pub trait PerRequest: Message {
    fn ctx(&self) -> Option<&RequestContext>;

    /// The request's id; empty when the message names none.
    fn request_id(&self) -> &str {
        self.ctx().map_or("", |c| c.request_id.as_str())
    }
}

macro_rules! per_request {
    ($($message:ty),* $(,)?) => {$(
        impl PerRequest for $message {
            fn ctx(&self) -> Option<&RequestContext> {
                self.ctx.as_ref()
            }
        }
    )*};
}

per_request!(v1::Query, v1::CleanedQuery, v1::AdmittedQuery, v1::Prompt, v1::Completion, v1::Result, v1::Envelope);

/// Microseconds since the unix epoch.
pub fn now_unix_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or_default()
}

/// Milliseconds since the unix epoch.
pub fn now_unix_ms() -> i64 {
    now_unix_us() / 1000
}

impl Timings {
    /// Records that `stage` handled the message from `received_unix_us` until now.
    pub fn record(&mut self, stage: &str, received_unix_us: i64) {
        self.stages.push(StageTiming { stage: stage.to_owned(), received_unix_us, finished_unix_us: now_unix_us() });
    }
}

impl TerminalStatus {
    /// The upper-case name used in the database and the HTTP API (`COMPLETED`, ...).
    pub fn name(self) -> &'static str {
        self.as_str_name()
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::from_str_name(&name.to_ascii_uppercase())
    }
}

/// gRPC metadata key carrying an error's machine-readable code.
pub const CODE_METADATA: &str = "x-millrace-code";

/// What kind of failure an API error is. This one table decides its HTTP status and its gRPC
/// code for every Millrace API, so the same failure answers alike everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request could not be read (syntax, types, encoding, headers): 400.
    BadRequest,
    /// It was read, but its content is refused (empty, too long, out of range): 422.
    Unprocessable,
    /// The body is over the size limit: 413.
    PayloadTooLarge,
    /// The body is not JSON: 415.
    UnsupportedMediaType,
    /// No credentials, or wrong ones: 401.
    Unauthenticated,
    /// What it names does not exist: 404.
    NotFound,
    /// This server cannot serve that kind of request as configured: 409.
    FailedPrecondition,
    /// Back off and retry (stream full, generators busy, too many in flight): 429.
    Overloaded,
    /// A dependency (NATS, the store, the results service) cannot be reached: 503.
    Unavailable,
    /// The request did not finish before its deadline: 504.
    Timeout,
    /// A fault of ours: 500.
    Internal,
}

impl ErrorClass {
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unprocessable => 422,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::Unauthenticated => 401,
            Self::NotFound => 404,
            Self::FailedPrecondition => 409,
            Self::Overloaded => 429,
            Self::Unavailable => 503,
            Self::Timeout => 504,
            Self::Internal => 500,
        }
    }

    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::BadRequest | Self::Unprocessable | Self::PayloadTooLarge | Self::UnsupportedMediaType => {
                Code::InvalidArgument
            }
            Self::Unauthenticated => Code::Unauthenticated,
            Self::NotFound => Code::NotFound,
            Self::FailedPrecondition => Code::FailedPrecondition,
            Self::Overloaded => Code::ResourceExhausted,
            Self::Unavailable => Code::Unavailable,
            Self::Timeout => Code::DeadlineExceeded,
            Self::Internal => Code::Internal,
        }
    }
}

/// A gRPC status for a Millrace error: its class's code; the message starts with the
/// machine-readable `code` (`"empty_text: …"`), which also rides in [`CODE_METADATA`].
pub fn coded_status(class: ErrorClass, code: &'static str, message: impl std::fmt::Display) -> tonic::Status {
    let mut status = tonic::Status::new(class.grpc_code(), format!("{code}: {message}"));
    status.metadata_mut().insert(CODE_METADATA, tonic::metadata::MetadataValue::from_static(code));
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coded_status_carries_its_class_code_and_machine_readable_code() {
        let status = coded_status(ErrorClass::Overloaded, "overloaded", "busy");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.message(), "overloaded: busy");
        assert_eq!(status.metadata().get(CODE_METADATA).unwrap(), "overloaded");
        assert_eq!(
            (ErrorClass::Unprocessable.http_status(), ErrorClass::Unprocessable.grpc_code()),
            (422, tonic::Code::InvalidArgument)
        );
        assert_eq!(
            (ErrorClass::Timeout.http_status(), ErrorClass::Timeout.grpc_code()),
            (504, tonic::Code::DeadlineExceeded)
        );
    }
}
