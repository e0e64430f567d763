//! `loadtest`: the Millrace load-test harness. See `loadtest/README.md`.
mod arrivals;
mod cli;
mod client;
mod findmax;
mod ledger;
mod phase;
mod record;
mod report;
mod runner;
mod sink;
mod stages;
mod stats;
mod workload;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = cli::Cli::parse();
    let finished = runner::execute(cli.command).await?;
    let files = finished
        .report
        .write(&finished.out_dir)
        .with_context(|| format!("writing the report to {}", finished.out_dir.display()))?;
    for file in &files {
        eprintln!("wrote {}", file.display());
    }
    println!("{}", finished.report.markdown());
    let ledger = &finished.report.ledger;
    if ledger.passed {
        Ok(ExitCode::SUCCESS)
    } else {
        match &ledger.sink_error {
            Some(error) => eprintln!(
                "ledger check FAILED: {error}; {} of {} accepted requests have no row that could be read",
                ledger.missing.count, ledger.accepted
            ),
            None => eprintln!(
                "ledger check FAILED: {} accepted requests have no row, {} rows are duplicates",
                ledger.missing.count, ledger.duplicates.count
            ),
        }
        Ok(ExitCode::FAILURE)
    }
}
