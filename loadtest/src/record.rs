//! What one request came to: how it ended ([`Ending`], from a client), its record from schedule
//! to end ([`RequestRecord`]), and the [`Event`]s a request task tells the phase loop. The
//! clients produce these, the phase loop gathers them, and the statistics, `find-max` and the
//! runner read them; this module imports none of those, so each of them depends on it alone.
use std::time::Duration;

use millrace_proto::v1::TerminalStatus;

use crate::workload::PromptClass;

/// How a request ended, as far as the client saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// The API delivered the request's terminal outcome at `at` (phase clock).
    Terminal { told: Told, at: Duration },
    /// Refused before acceptance (an HTTP error status, a WebSocket error frame, a gRPC error
    /// status), with the API's error code.
    Rejected { code: String },
    /// The connection or the protocol broke.
    Failed { error: String },
    /// Still open when the phase's drain timeout ran out; the harness gave up on it.
    TimedOut,
}

/// What the API told of a request's end.
#[derive(Debug, Clone, PartialEq)]
pub enum Told {
    /// Its terminal status: WebSocket and gRPC carry it; the chat stream's `stop` and `length`
    /// finishes are `COMPLETED`.
    Status(TerminalStatus),
    /// The chat stream's `content_filter` finish: blocked on input or on output (it does not say).
    Blocked,
    /// Another chat finish reason.
    Finish(String),
    /// The chat stream's error event, with its code.
    StreamError(String),
}

impl Ending {
    /// The key under which the report counts this ending.
    pub fn label(&self) -> String {
        match self {
            Self::Terminal { told: Told::Status(status), .. } => status.name().to_owned(),
            Self::Terminal { told: Told::Blocked, .. } => "BLOCKED".to_owned(),
            Self::Terminal { told: Told::Finish(reason), .. } => format!("finish:{reason}"),
            Self::Terminal { told: Told::StreamError(code), .. } => format!("stream_error:{code}"),
            Self::Rejected { code } => format!("rejected:{code}"),
            Self::Failed { .. } => "failed".to_owned(),
            Self::TimedOut => "timed_out".to_owned(),
        }
    }

    pub fn is_completed(&self) -> bool {
        matches!(self, Self::Terminal { told: Told::Status(TerminalStatus::Completed), .. })
    }
}

/// What request tasks tell the phase loop.
#[derive(Debug)]
pub enum Event {
    Accepted { at: Duration },
    Ended(Box<RequestRecord>),
}

/// One request from schedule to end. Times are offsets on the phase clock.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub seq: u64,
    pub class: PromptClass,
    /// When the schedule meant it to be sent: the origin of its latencies.
    pub intended: Duration,
    pub sent_lag: Duration,
    pub request_id: Option<String>,
    pub first_token_at: Option<Duration>,
    pub ended_at: Duration,
    pub ending: Ending,
}

impl RequestRecord {
    /// Intended send → terminal outcome received, for a COMPLETED request. Other endings are
    /// counted, not timed: a quick refusal would otherwise pass for a fast answer.
    pub fn e2e(&self) -> Option<Duration> {
        self.ending.is_completed().then(|| self.ended_at.saturating_sub(self.intended))
    }

    /// Intended send → first non-empty token, for a COMPLETED request.
    pub fn ttft(&self) -> Option<Duration> {
        self.first_token_at.filter(|_| self.ending.is_completed()).map(|at| at.saturating_sub(self.intended))
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A short-prompt request sent on time at 0 s that ended as `ending`, first token 10 ms in.
    pub fn record(ending: Ending) -> RequestRecord {
        let ended_at = match &ending {
            Ending::Terminal { at, .. } => *at,
            _ => Duration::from_secs(1),
        };
        RequestRecord {
            seq: 0,
            class: PromptClass::Short,
            intended: Duration::ZERO,
            sent_lag: Duration::ZERO,
            request_id: Some("r".into()),
            first_token_at: Some(Duration::from_millis(10)),
            ended_at,
            ending,
        }
    }

    /// A request that completed `e2e` after its intended send.
    pub fn completed(e2e: Duration) -> RequestRecord {
        record(Ending::Terminal { told: Told::Status(TerminalStatus::Completed), at: e2e })
    }

    #[test]
    fn endings_label_and_classify() {
        let at = Duration::ZERO;
        assert_eq!(Ending::Terminal { told: Told::Status(TerminalStatus::Completed), at }.label(), "COMPLETED");
        assert!(Ending::Terminal { told: Told::Status(TerminalStatus::Completed), at }.is_completed());
        assert!(!Ending::Terminal { told: Told::Status(TerminalStatus::Expired), at }.is_completed());
        assert_eq!(Ending::Rejected { code: "overloaded".into() }.label(), "rejected:overloaded");
        assert_eq!(Ending::Failed { error: "x".into() }.label(), "failed");
        assert_eq!(Ending::TimedOut.label(), "timed_out");
    }

    #[test]
    fn latencies_count_from_the_intended_send_time() {
        let mut r = completed(Duration::from_millis(900));
        r.intended = Duration::from_millis(200);
        r.sent_lag = Duration::from_millis(150);
        assert_eq!(r.e2e(), Some(Duration::from_millis(700)), "the send lag is part of the latency");
        r.first_token_at = Some(Duration::from_millis(500));
        assert_eq!(r.ttft(), Some(Duration::from_millis(300)));
        assert_eq!(record(Ending::TimedOut).e2e(), None);
        let expired =
            record(Ending::Terminal { told: Told::Status(TerminalStatus::Expired), at: Duration::from_secs(2) });
        assert_eq!((expired.e2e(), expired.ttft()), (None, None), "only COMPLETED requests are timed");
    }
}
