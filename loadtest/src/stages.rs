//! Where the time went inside the mesh, from the stage timings in each sink row: every stage's
//! service time (received → finished) and every hop between stages (previous finished → next
//! received: queueing on the stream plus transport).
use std::time::Duration;

use serde::Serialize;

use crate::sink::SinkRow;
use crate::stats::{LatencyHistogram, Percentiles};

/// The pseudo-stage a row's last hop ends in.
const SINK: &str = "sink";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SegmentKind {
    /// Time inside one stage.
    Service,
    /// Time between two stages.
    Hop,
    /// The whole mesh: first stage received → row stored.
    Total,
}

/// Histograms per stage and per hop, in the order they first appeared (pipeline order).
#[derive(Debug, Default)]
pub struct StageBreakdown {
    segments: Vec<(String, SegmentKind, LatencyHistogram)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    /// A stage name, `a → b` for a hop, or `mesh total`.
    pub name: String,
    pub kind: SegmentKind,
    pub latency: Percentiles,
}

impl StageBreakdown {
    fn record(&mut self, name: &str, kind: SegmentKind, from_us: i64, to_us: i64) {
        // Stages on different hosts may disagree on the clock by a little; never below zero.
        let duration = Duration::from_micros(to_us.saturating_sub(from_us).max(0) as u64);
        let index = match self.segments.iter().position(|(n, k, _)| n == name && *k == kind) {
            Some(index) => index,
            None => {
                self.segments.push((name.to_owned(), kind, LatencyHistogram::default()));
                self.segments.len() - 1
            }
        };
        self.segments[index].2.record(duration);
    }

    pub fn add(&mut self, row: &SinkRow) {
        let Some(first) = row.timings.first() else { return };
        let mut previous: Option<&millrace_proto::v1::StageTiming> = None;
        for timing in &row.timings {
            if let Some(prev) = previous {
                let hop = format!("{} → {}", prev.stage, timing.stage);
                self.record(&hop, SegmentKind::Hop, prev.finished_unix_us, timing.received_unix_us);
            }
            self.record(&timing.stage, SegmentKind::Service, timing.received_unix_us, timing.finished_unix_us);
            previous = Some(timing);
        }
        // stored_unix_ms has millisecond resolution, so the last hop and the total are coarser.
        if row.stored_unix_ms > 0 {
            let stored_us = row.stored_unix_ms * 1000;
            let last = previous.expect("timings are not empty");
            self.record(&format!("{} → {SINK}", last.stage), SegmentKind::Hop, last.finished_unix_us, stored_us);
            self.record("mesh total", SegmentKind::Total, first.received_unix_us, stored_us);
        }
    }

    pub fn segments(&self) -> Vec<Segment> {
        self.segments
            .iter()
            .map(|(name, kind, histogram)| Segment {
                name: name.clone(),
                kind: *kind,
                latency: histogram.percentiles(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use millrace_proto::v1::StageTiming;

    use super::*;

    fn timing(stage: &str, received_unix_us: i64, finished_unix_us: i64) -> StageTiming {
        StageTiming { stage: stage.into(), received_unix_us, finished_unix_us }
    }

    fn row(timings: Vec<StageTiming>, stored_unix_ms: i64) -> SinkRow {
        SinkRow {
            request_id: "r".into(),
            user: "u".into(),
            status: millrace_proto::v1::TerminalStatus::Completed,
            timings,
            stored_unix_ms,
        }
    }

    #[test]
    fn service_times_and_hops_come_out_in_pipeline_order() {
        let mut breakdown = StageBreakdown::default();
        breakdown.add(&row(vec![timing("ingest", 1_000, 1_500), timing("preprocess", 2_000, 2_300)], 4));
        breakdown.add(&row(vec![timing("ingest", 10_000, 10_700), timing("preprocess", 11_000, 11_100)], 0));
        breakdown.add(&row(vec![], 9));
        let segments = breakdown.segments();
        let names: Vec<&str> = segments.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["ingest", "ingest → preprocess", "preprocess", "preprocess → sink", "mesh total"]);
        let ms = |name: &str| {
            let s = segments.iter().find(|s| s.name == name).unwrap();
            // HDR reports the top of the value's bucket: round to what the test means.
            (s.kind, s.latency.count, (s.latency.max_ms * 100.0).round() / 100.0)
        };
        assert_eq!(ms("ingest"), (SegmentKind::Service, 2, 0.7));
        assert_eq!(ms("ingest → preprocess"), (SegmentKind::Hop, 2, 0.5));
        assert_eq!(ms("preprocess"), (SegmentKind::Service, 2, 0.3));
        assert_eq!(ms("preprocess → sink"), (SegmentKind::Hop, 1, 1.7));
        assert_eq!(ms("mesh total"), (SegmentKind::Total, 1, 3.0));
    }

    #[test]
    fn a_clock_step_backwards_counts_as_zero() {
        let mut breakdown = StageBreakdown::default();
        breakdown.add(&row(vec![timing("a", 5_000, 6_000), timing("b", 5_500, 7_000)], 0));
        let hop = breakdown.segments().into_iter().find(|s| s.kind == SegmentKind::Hop).unwrap();
        assert_eq!((hop.latency.count, hop.latency.max_ms), (1, 0.0));
    }
}
