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

/// A gRPC status for a Millrace error: the message starts with the machine-readable `code`
/// (`"empty_text: …"`), which also rides in [`CODE_METADATA`].
pub fn coded_status(grpc: tonic::Code, code: &'static str, message: impl std::fmt::Display) -> tonic::Status {
    let mut status = tonic::Status::new(grpc, format!("{code}: {message}"));
    status.metadata_mut().insert(CODE_METADATA, tonic::metadata::MetadataValue::from_static(code));
    status
}
