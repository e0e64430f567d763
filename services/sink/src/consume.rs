//! The sink's two stages: terminal results and dead letters, each a row (at most one per
//! request), committed before the message is acked.
use std::time::Duration;

use millrace_bus::{Delivery, Handler, StageError};
use millrace_proto::now_unix_ms;
use millrace_proto::v1::{DlqRecord, Result as TerminalResult, TerminalStatus};

use crate::row::{DeadLetterRow, ResultRow};
use crate::store::Write;
use crate::writer::{WriteError, Writer};

/// The database is the sink's next edge: while it refuses commits (down, locked, full) results
/// wait on their stream, held rather than naked, so an outage longer than the retry horizon
/// does not dead-letter them.
fn retry(e: WriteError) -> StageError {
    StageError::Backpressure { detail: e.to_string(), delay: Duration::from_secs(1) }
}

pub struct ResultsStage {
    pub writer: Writer,
}

impl Handler for ResultsStage {
    async fn handle(&self, delivery: &Delivery) -> Result<(), StageError> {
        let result: TerminalResult = delivery.decode()?;
        let ctx = result.ctx.clone();
        let row = ResultRow::from_result(result, now_unix_ms())
            .map_err(|e| StageError::poison(TerminalStatus::Failed, e.code(), e.to_string(), ctx))?;
        self.writer.write(Write::Result(Box::new(row))).await.map_err(retry)?;
        Ok(())
    }
}

pub struct DeadLetterStage {
    pub writer: Writer,
}

impl Handler for DeadLetterStage {
    async fn handle(&self, delivery: &Delivery) -> Result<(), StageError> {
        let record: DlqRecord = delivery.decode()?;
        if record.request_id.is_empty() {
            return Err(StageError::poison(
                TerminalStatus::Failed,
                "missing_request_id",
                "dead letter has no request id",
                None,
            ));
        }
        // A dead letter that is one request's also stands for its FAILED row; one that holds
        // several (a batch) has sent each member's terminal result on RESULTS instead.
        let failed = record.ctx.is_some().then(|| ResultRow::failed_from_dead_letter(&record, now_unix_ms()));
        self.writer
            .write(Write::DeadLetter(Box::new(DeadLetterRow::from_record(&record)), failed.map(Box::new)))
            .await
            .map_err(retry)?;
        Ok(())
    }
}
