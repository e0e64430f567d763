//! `chaos`: runs a fault schedule against the whole mesh and writes the report (see
//! `chaos/README.md`). Exit status 0 only when every invariant held; 1 when one failed; 2 when
//! the run could not be carried out.
use clap::Parser;
use millrace_chaos::config::Config;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    match millrace_chaos::run(config).await {
        Ok(report) => {
            println!("{}", report.fault_table());
            for check in &report.checks {
                println!("{} {}: {}", if check.passed { "PASS" } else { "FAIL" }, check.name, check.detail);
            }
            println!("\nreport: {}", report.run_dir.join("report.md").display());
            if report.passed { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("chaos: the run could not be carried out: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
