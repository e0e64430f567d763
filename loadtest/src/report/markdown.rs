//! `summary.md`: the ledger verdict, the settings, the find-max result and each phase's
//! latencies, outcomes and stage breakdown.
use std::collections::BTreeMap;
use std::fmt::Write;

use clap::ValueEnum;

use super::{PhaseReport, PhaseRole, Report, SVG_FILE};
use crate::client::Api;
use crate::stats::Percentiles;

pub fn render(report: &Report) -> String {
    let mut md = String::new();
    let s = &report.settings;
    let l = &report.ledger;
    // `write!` to a String cannot fail.
    let _ = writeln!(md, "# Millrace load test `{}`\n", report.run_id);
    let _ = writeln!(
        md,
        "**Ledger: {}** — {} accepted, {} rows, {} missing, {} duplicate, {} unknown.\n",
        if l.passed { "PASSED" } else { "FAILED" },
        l.accepted,
        l.rows,
        l.missing.count,
        l.duplicates.count,
        l.unknown.count,
    );
    if let Some(error) = &l.sink_error {
        let _ = writeln!(md, "- the sink's rows could not be read: {}\n", error.replace('\n', " "));
    }
    for (kind, d) in [("missing", &l.missing), ("duplicate", &l.duplicates), ("unknown", &l.unknown)] {
        if d.count > 0 {
            let _ = writeln!(
                md,
                "- {kind}: {}\n",
                d.sample.iter().map(|id| format!("`{id}`")).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let api = match s.api {
        Api::Http => format!("http at {}", cell(&s.ingest_url)),
        Api::Ws => format!("ws at {} ({} sockets)", cell(&s.ingest_url), s.connections),
        Api::Grpc => format!("grpc at {} ({} connections)", cell(&s.grpc_url), s.connections),
    };
    let _ = writeln!(md, "| setting | value |\n|---|---|");
    let _ = writeln!(md, "| API | {api} |");
    let eos = if s.ignore_eos { " (EOS ignored)" } else { "" };
    let _ = writeln!(md, "| model | `{}`, max_new_tokens {}{eos} |", cell(&s.model), s.max_new_tokens);
    let _ = writeln!(md, "| conversations | {} request(s) each |", s.turns);
    let _ =
        writeln!(md, "| deadline | {} |", s.deadline_ms.map_or("service default".to_owned(), |d| format!("{d} ms")));
    let _ = writeln!(md, "| users | {} (`{}` …) |", s.users.len(), s.users.first().map_or("", String::as_str));
    let _ = writeln!(md, "| prompt mix | {} |", s.prompt_mix);
    let arrivals = s.arrivals.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
    let _ = writeln!(md, "| arrivals | {arrivals}, seed {} |", s.seed);
    let _ = writeln!(md, "| drain / ledger timeout | {} s / {} s |\n", s.drain_timeout_s, s.ledger_timeout_s);
    let _ = writeln!(md, "![latency percentiles and throughput per second]({SVG_FILE})\n");

    if let Some(find_max) = &report.find_max {
        match find_max.max_sustained_rps {
            Some(rate) => {
                let _ = writeln!(md, "## Maximum sustained rate: **{rate:.1} req/s**\n");
            }
            None => {
                let _ = writeln!(
                    md,
                    "## Maximum sustained rate: none — the first step ({:.1} req/s) was not sustained\n",
                    find_max.start_rps
                );
            }
        }
        let c = &find_max.criteria;
        let _ = writeln!(
            md,
            "Steps of {} s from {:.1} req/s, ×{} each. Sustained = completes ≥ {:.0}% of what was offered in steady \
             state, ≤ {:.1}% not completed, p99 ≤ {}× the first step's{}.\n",
            find_max.step_duration_s,
            find_max.start_rps,
            find_max.step_factor,
            c.min_throughput_ratio * 100.0,
            c.max_error_ratio * 100.0,
            c.max_p99_growth,
            c.max_p99_ms.map_or(String::new(), |ms| format!(" and ≤ {ms} ms")),
        );
        let _ = writeln!(
            md,
            "| step | offered/s | achieved/s | completed/offered | e2e p50 ms | e2e p99 ms | not completed | sustained | why not |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|---|");
        for phase in &report.phases {
            if let Some(v) = &phase.verdict {
                let _ = writeln!(
                    md,
                    "| {} | {:.1} | {:.1} | {:.0}% | {} | {} | {:.1}% | {} | {} |",
                    cell(&phase.label),
                    phase.offered_rps,
                    v.achieved_rps,
                    v.throughput_ratio * 100.0,
                    ms(phase.e2e.count, phase.e2e.p50_ms),
                    ms(phase.e2e.count, phase.e2e.p99_ms),
                    v.error_ratio * 100.0,
                    if v.sustained { "yes" } else { "no" },
                    cell(&v.reasons.join("; ")),
                );
            }
        }
        let fractions: Vec<&PhaseReport> =
            report.phases.iter().filter(|p| matches!(p.role, PhaseRole::Fraction(_))).collect();
        if !fractions.is_empty() {
            let _ = writeln!(md, "\n### At fractions of the maximum\n");
            let _ = writeln!(
                md,
                "| fraction | offered/s | throughput/s | e2e p50 ms | e2e p99 ms | TTFT p50 ms | TTFT p99 ms |"
            );
            let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
            for p in fractions {
                let PhaseRole::Fraction(fraction) = p.role else { continue };
                let _ = writeln!(
                    md,
                    "| {:.0}% | {:.1} | {:.1} | {} | {} | {} | {} |",
                    fraction * 100.0,
                    p.offered_rps,
                    p.throughput_rps,
                    ms(p.e2e.count, p.e2e.p50_ms),
                    ms(p.e2e.count, p.e2e.p99_ms),
                    ms(p.ttft.count, p.ttft.p50_ms),
                    ms(p.ttft.count, p.ttft.p99_ms),
                );
            }
        }
        md.push('\n');
    }

    for phase in &report.phases {
        render_phase(&mut md, phase);
    }
    md
}

fn render_phase(md: &mut String, p: &PhaseReport) {
    let _ = writeln!(md, "## Phase `{}` — {:.1} req/s offered for {} s\n", p.label, p.offered_rps, p.duration_s);
    let _ = writeln!(
        md,
        "Sent {}, accepted {}; {:.1} COMPLETED/s; the last request ended {:.1} s after the phase began.\n",
        p.sent, p.accepted, p.throughput_rps, p.elapsed_s
    );
    let _ =
        writeln!(md, "| latency (ms) | count | p50 | p90 | p99 | p99.9 | max |\n|---|---:|---:|---:|---:|---:|---:|");
    let mut rows = vec![
        ("end to end".to_owned(), &p.e2e),
        ("time to first token".to_owned(), &p.ttft),
        ("send lag".to_owned(), &p.send_lag),
    ];
    rows.extend(p.e2e_by_prompt.iter().map(|(class, h)| (format!("end to end, {class} prompts"), h)));
    for (name, h) in rows {
        latency_row(md, &name, h);
    }
    let _ = writeln!(md, "\nClient outcomes: {}  ", counts(&p.outcomes));
    let _ = writeln!(md, "Sink statuses of accepted requests: {}\n", counts(&p.statuses));
    if !p.stages.is_empty() {
        let _ = writeln!(
            md,
            "| mesh segment | kind | count | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---:|---:|---:|---:|---:|"
        );
        for s in &p.stages {
            let l = &s.latency;
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                cell(&s.name),
                format!("{:?}", s.kind).to_lowercase(),
                l.count,
                ms(l.count, l.p50_ms),
                ms(l.count, l.p90_ms),
                ms(l.count, l.p99_ms),
                ms(l.count, l.max_ms),
            );
        }
        md.push('\n');
    }
    if !p.error_samples.is_empty() {
        let _ = writeln!(md, "Error samples:\n");
        for e in &p.error_samples {
            let _ = writeln!(md, "- `{}`", e.replace('`', "'"));
        }
        md.push('\n');
    }
}

fn latency_row(md: &mut String, name: &str, h: &Percentiles) {
    let _ = writeln!(
        md,
        "| {name} | {} | {} | {} | {} | {} | {} |",
        h.count,
        ms(h.count, h.p50_ms),
        ms(h.count, h.p90_ms),
        ms(h.count, h.p99_ms),
        ms(h.count, h.p999_ms),
        ms(h.count, h.max_ms),
    );
}

/// Milliseconds with the precision that matters at their size; `–` for an empty histogram.
fn ms(count: u64, value: f64) -> String {
    match (count, value) {
        (0, _) => "–".to_owned(),
        (_, v) if v < 10.0 => format!("{v:.2}"),
        (_, v) if v < 100.0 => format!("{v:.1}"),
        (_, v) => format!("{v:.0}"),
    }
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    map.iter().map(|(k, v)| format!("`{}` {v}", k.replace('`', "'"))).collect::<Vec<_>>().join(" · ")
}

/// Text safe inside a table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::super::tests::{phase, report};
    use super::*;
    use crate::findmax::{Criteria, StepVerdict};
    use crate::report::FindMaxReport;

    #[test]
    fn a_run_summary_shows_the_ledger_latencies_outcomes_and_stages() {
        let md = render(&report(vec![phase("run", PhaseRole::Run, 10.0, None)], None, true));
        assert!(md.starts_with("# Millrace load test `abc123`"));
        assert!(md.contains("**Ledger: PASSED** — 99 accepted, 99 rows, 0 missing, 0 duplicate, 0 unknown."));
        assert!(md.contains("| API | ws at http://127.0.0.1:8080 (4 sockets) |"), "{md}");
        assert!(md.contains("| arrivals | poisson, seed 1 |"), "{md}");
        assert!(md.contains("Sent 100, accepted 99; 9.4 COMPLETED/s; the last request ended 10.5 s after"), "{md}");
        assert!(md.contains("| end to end | 10 | 120 | 384 | 480 | 480 | 480 |"), "{md}");
        assert!(md.contains("| time to first token | 10 | 40.0 | 72.0 | 90.0 | 90.0 | 90.0 |"), "{md}");
        assert!(md.contains("| end to end, short prompts |"));
        assert!(md.contains("`COMPLETED` 98 · `rejected:overloaded` 1 · `timed_out` 1"));
        assert!(md.contains("| ingest → preprocess | hop | 10 | 0.80 |"), "{md}");
        assert!(md.contains("![latency percentiles and throughput per second](chart.svg)"));
        assert!(md.contains("- `HTTP: connection refused <local>`"));
        assert!(!md.contains("Maximum sustained rate"));
    }

    #[test]
    fn a_failed_ledger_lists_the_missing_ids() {
        let md = render(&report(vec![phase("run", PhaseRole::Run, 10.0, None)], None, false));
        assert!(md.contains("**Ledger: FAILED**") && md.contains("- missing: `r-lost`"), "{md}");
        assert!(!md.contains("could not be read"), "{md}");
    }

    #[test]
    fn an_unreadable_sink_is_named_in_the_ledger_verdict() {
        let mut report = report(vec![phase("run", PhaseRole::Run, 10.0, None)], None, false);
        report.ledger.sink_error = Some("sink unreachable at http://127.0.0.1:8090/: connection refused".into());
        let md = render(&report);
        assert!(md.contains("**Ledger: FAILED**"), "{md}");
        let line =
            "- the sink's rows could not be read: sink unreachable at http://127.0.0.1:8090/: connection refused";
        assert!(md.contains(line), "{md}");
    }

    #[test]
    fn find_max_shows_the_maximum_the_steps_and_the_fractions() {
        let verdict = |sustained: bool| StepVerdict {
            sustained,
            achieved_rps: if sustained { 10.0 } else { 12.0 },
            throughput_ratio: if sustained { 1.0 } else { 0.8 },
            error_ratio: 0.0,
            p99_ms: 480.0,
            reasons: if sustained { vec![] } else { vec!["completed 80% of what was offered (< 95%)".into()] },
        };
        let phases = vec![
            phase("step 1", PhaseRole::Step, 10.0, Some(verdict(true))),
            phase("step 2", PhaseRole::Step, 15.0, Some(verdict(false))),
            phase("50%", PhaseRole::Fraction(0.5), 5.0, None),
        ];
        let find_max = FindMaxReport {
            criteria: Criteria {
                min_throughput_ratio: 0.95,
                max_error_ratio: 0.01,
                max_p99_ms: None,
                max_p99_growth: 5.0,
            },
            start_rps: 10.0,
            step_factor: 1.5,
            step_duration_s: 10.0,
            max_sustained_rps: Some(10.0),
        };
        let md = render(&report(phases, Some(find_max), true));
        assert!(md.contains("## Maximum sustained rate: **10.0 req/s**"), "{md}");
        assert!(md.contains("| step 1 | 10.0 | 10.0 | 100% | 120 | 480 | 0.0% | yes |  |"), "{md}");
        let step_2 =
            "| step 2 | 15.0 | 12.0 | 80% | 120 | 480 | 0.0% | no | completed 80% of what was offered (< 95%) |";
        assert!(md.contains(step_2), "{md}");
        assert!(md.contains("| 50% | 5.0 | 9.4 | 120 | 480 | 40.0 | 90.0 |"), "{md}");
        assert!(md.contains("## Phase `50%` — 5.0 req/s offered for 10 s"));
    }

    #[test]
    fn milliseconds_are_rounded_by_size_and_cells_escaped() {
        assert_eq!(
            (ms(1, 1.234), ms(1, 12.34), ms(1, 123.4), ms(0, 5.0)),
            ("1.23".into(), "12.3".into(), "123".into(), "–".into())
        );
        assert_eq!(cell("a|b\nc"), "a\\|b c");
    }
}
