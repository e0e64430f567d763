//! The sink's dead-letter row; result rows are [`millrace_proto::row::ResultRow`], shared
//! with ingest, which hands the same shape to clients.
use millrace_proto::v1::DlqRecord;
use serde::Serialize;

pub use millrace_proto::row::{InvalidResult, ResultRow};

/// A dead-letter record as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterRow {
    pub id: String,
    pub request_id: String,
    pub stage: String,
    pub stream: String,
    pub subject: String,
    pub stream_sequence: u64,
    pub deliveries: u64,
    pub reason: String,
    pub detail: String,
    pub payload_hex: String,
    pub failed_unix_ms: i64,
}

impl DeadLetterRow {
    pub fn from_record(record: &DlqRecord) -> Self {
        Self {
            id: format!("{}/{}", record.stream, record.stream_sequence),
            request_id: record.request_id.clone(),
            stage: record.stage.clone(),
            stream: record.stream.clone(),
            subject: record.subject.clone(),
            stream_sequence: record.stream_sequence,
            deliveries: record.deliveries,
            reason: record.reason.clone(),
            detail: record.detail.clone(),
            payload_hex: record.payload.iter().map(|b| format!("{b:02x}")).collect(),
            failed_unix_ms: record.failed_unix_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_are_keyed_by_their_stream_position() {
        let record = DlqRecord {
            stream: "MR_RESULTS".into(),
            stream_sequence: 9,
            payload: vec![0xde, 0xad],
            ..Default::default()
        };
        let row = DeadLetterRow::from_record(&record);
        assert_eq!((row.id.as_str(), row.payload_hex.as_str()), ("MR_RESULTS/9", "dead"));
    }
}
