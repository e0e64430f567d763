//! Command line: `loadtest run` (a fixed offered rate) and `loadtest find-max` (the highest
//! sustained rate, then latency at fractions of it). Every flag also reads an environment
//! variable `MILLRACE_LOADTEST_<FLAG>`.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::arrivals::ArrivalProcess;
use crate::client::Api;
use crate::workload::PromptMix;

/// Open-loop load against the Millrace mesh: latency from the intended send time into HDR
/// histograms, a ledger check against the sink, and a JSON/Markdown/SVG report.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Offer a fixed rate for a fixed time.
    Run(RunArgs),
    /// Step the offered rate up until the mesh stops keeping up; report the highest sustained
    /// rate, then (with --fractions) latency at fractions of it.
    FindMax(FindMaxArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Offered requests per second.
    #[arg(long, env = "MILLRACE_LOADTEST_RATE", default_value_t = 10.0, value_parser = positive)]
    pub rate: f64,
    /// How long to send, in seconds.
    #[arg(long, env = "MILLRACE_LOADTEST_DURATION_S", default_value_t = 30.0, value_parser = positive)]
    pub duration_s: f64,
}

#[derive(Debug, Args)]
pub struct FindMaxArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Offered rate of the first step, requests per second.
    #[arg(long, env = "MILLRACE_LOADTEST_START_RATE", default_value_t = 5.0, value_parser = positive)]
    pub start_rate: f64,
    /// Each sustained step's rate times this is the next step's.
    #[arg(long, env = "MILLRACE_LOADTEST_STEP_FACTOR", default_value_t = 1.5, value_parser = above_one)]
    pub step_factor: f64,
    /// Length of each step's schedule, in seconds.
    #[arg(long, env = "MILLRACE_LOADTEST_STEP_DURATION_S", default_value_t = 10.0, value_parser = positive)]
    pub step_duration_s: f64,
    /// Never offer more than this, requests per second.
    #[arg(long, env = "MILLRACE_LOADTEST_MAX_RATE", default_value_t = 10_000.0, value_parser = positive)]
    pub max_rate: f64,
    /// Geometric bisections between the last sustained and the first failed rate.
    #[arg(long, env = "MILLRACE_LOADTEST_REFINE", default_value_t = 2)]
    pub refine: u32,
    /// A sustained step completes at least this share of what it offered (in steady state).
    #[arg(long, env = "MILLRACE_LOADTEST_MIN_THROUGHPUT_RATIO", default_value_t = 0.95, value_parser = fraction)]
    pub min_throughput_ratio: f64,
    /// A sustained step has at most this share of its requests end other than COMPLETED.
    #[arg(long, env = "MILLRACE_LOADTEST_MAX_ERROR_RATIO", default_value_t = 0.01, value_parser = ratio)]
    pub max_error_ratio: f64,
    /// A sustained step's p99 end-to-end latency stays under this, in milliseconds.
    #[arg(long, env = "MILLRACE_LOADTEST_MAX_P99_MS", value_parser = positive)]
    pub max_p99_ms: Option<f64>,
    /// A sustained step's p99 stays under this multiple of the first step's p99.
    #[arg(long, env = "MILLRACE_LOADTEST_MAX_P99_GROWTH", default_value_t = 10.0, value_parser = above_one)]
    pub max_p99_growth: f64,
    /// Afterwards, run at these fractions of the maximum sustained rate (e.g. 0.25,0.5,0.75).
    #[arg(long, env = "MILLRACE_LOADTEST_FRACTIONS", value_delimiter = ',', value_parser = fraction)]
    pub fractions: Vec<f64>,
    /// Length of each fraction run, in seconds.
    #[arg(long, env = "MILLRACE_LOADTEST_FRACTION_DURATION_S", default_value_t = 30.0, value_parser = positive)]
    pub fraction_duration_s: f64,
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Which API of ingest to load.
    #[arg(long, env = "MILLRACE_LOADTEST_API", value_enum, default_value_t = Api::Http)]
    pub api: Api,
    /// Ingest's HTTP base URL (also the WebSocket endpoint's, as ws://…/v1/ws).
    #[arg(long, env = "MILLRACE_LOADTEST_INGEST_URL", default_value = "http://127.0.0.1:8080")]
    pub ingest_url: String,
    /// Ingest's gRPC URL.
    #[arg(long, env = "MILLRACE_LOADTEST_GRPC_URL", default_value = "http://127.0.0.1:50051")]
    pub grpc_url: String,
    /// API key sent as `Authorization: Bearer <key>` on every API (when ingest has keys on).
    #[arg(long, env = "MILLRACE_LOADTEST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The sink's HTTP base URL, for the ledger check and the per-stage breakdown.
    #[arg(long, env = "MILLRACE_LOADTEST_SINK_URL", default_value = "http://127.0.0.1:8090")]
    pub sink_url: String,
    /// Model every request names.
    #[arg(long, env = "MILLRACE_LOADTEST_MODEL", default_value = "tiny-llama")]
    pub model: String,
    /// `params.max_new_tokens` of every request (`max_tokens` over HTTP).
    #[arg(long, env = "MILLRACE_LOADTEST_MAX_NEW_TOKENS", default_value_t = 32)]
    pub max_new_tokens: u32,
    /// Generate exactly --max-new-tokens per request, past the end of sequence (vLLM's
    /// `ignore_eos`), so runs and engines compare equal work.
    #[arg(long, env = "MILLRACE_LOADTEST_IGNORE_EOS")]
    pub ignore_eos: bool,
    /// Requests per conversation: a user's next `turns` requests share a session, so turn k
    /// carries the k − 1 exchanges before it (the session's history; prefix KV reuse).
    #[arg(long, env = "MILLRACE_LOADTEST_TURNS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub turns: u32,
    /// Relative deadline of each request in milliseconds (ws and grpc; the chat API sets its own).
    #[arg(long, env = "MILLRACE_LOADTEST_DEADLINE_MS")]
    pub deadline_ms: Option<u32>,
    /// Distinct users (`lt-<run id>-<k>`); each request picks one. Keep rate / users under the
    /// session service's per-user rate limit (5/s by default) unless that limit is under test.
    #[arg(long, env = "MILLRACE_LOADTEST_USERS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub users: u32,
    /// Weights of the built-in short/medium/long prompts.
    #[arg(long, env = "MILLRACE_LOADTEST_PROMPT_MIX", default_value = "short=6,medium=3,long=1")]
    pub prompt_mix: PromptMix,
    /// WebSocket connections (ws) or HTTP/2 connections (grpc) to spread requests over.
    #[arg(long, env = "MILLRACE_LOADTEST_SOCKETS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub sockets: u32,
    /// How arrivals are spaced.
    #[arg(long, env = "MILLRACE_LOADTEST_ARRIVALS", value_enum, default_value_t = ArrivalProcess::Poisson)]
    pub arrivals: ArrivalProcess,
    /// Seed of the arrival times and the per-request choices (phase k uses seed + k).
    #[arg(long, env = "MILLRACE_LOADTEST_SEED", default_value_t = 1)]
    pub seed: u64,
    /// After a phase's last scheduled send, how long open requests are waited for before they
    /// are given up (counted as timed out) and their connections closed, in seconds.
    #[arg(long, env = "MILLRACE_LOADTEST_DRAIN_TIMEOUT_S", default_value_t = 30.0, value_parser = positive)]
    pub drain_timeout_s: f64,
    /// How long the ledger check (and the settling between phases) waits for the sink to hold
    /// a row for every accepted request, in seconds.
    #[arg(long, env = "MILLRACE_LOADTEST_LEDGER_TIMEOUT_S", default_value_t = 30.0, value_parser = positive)]
    pub ledger_timeout_s: f64,
    /// Folder for results.json, summary.md and chart.svg [default: target/loadtest/<run id>].
    #[arg(long, env = "MILLRACE_LOADTEST_OUT")]
    pub out: Option<PathBuf>,
}

impl CommonArgs {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.drain_timeout_s)
    }

    pub fn ledger_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.ledger_timeout_s)
    }
}

fn number(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .map_err(|e| e.to_string())
        .and_then(|x| if x.is_finite() { Ok(x) } else { Err("not finite".into()) })
}

fn positive(s: &str) -> Result<f64, String> {
    number(s).and_then(|x| if x > 0.0 { Ok(x) } else { Err(format!("must be above 0, got {x}")) })
}

fn above_one(s: &str) -> Result<f64, String> {
    number(s).and_then(|x| if x > 1.0 { Ok(x) } else { Err(format!("must be above 1, got {x}")) })
}

/// In (0, 1].
fn fraction(s: &str) -> Result<f64, String> {
    number(s).and_then(|x| if x > 0.0 && x <= 1.0 { Ok(x) } else { Err(format!("must be in (0, 1], got {x}")) })
}

/// In [0, 1].
fn ratio(s: &str) -> Result<f64, String> {
    number(s).and_then(|x| if (0.0..=1.0).contains(&x) { Ok(x) } else { Err(format!("must be in [0, 1], got {x}")) })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn find_max_parses_fractions_and_defaults() {
        let cli =
            Cli::try_parse_from(["loadtest", "find-max", "--api", "grpc", "--fractions", "0.25,0.5,0.75"]).unwrap();
        let Command::FindMax(args) = cli.command else { panic!("find-max expected") };
        assert_eq!(args.fractions, [0.25, 0.5, 0.75]);
        assert_eq!(args.common.api, Api::Grpc);
        assert_eq!((args.start_rate, args.step_factor, args.refine), (5.0, 1.5, 2));
        assert_eq!(args.common.prompt_mix.to_string(), "short=6,medium=3,long=1");
    }

    #[test]
    fn nonsense_values_are_refused() {
        for args in [
            &["loadtest", "run", "--rate", "0"][..],
            &["loadtest", "run", "--rate", "NaN"],
            &["loadtest", "find-max", "--step-factor", "1"],
            &["loadtest", "find-max", "--fractions", "0.5,1.5"],
            &["loadtest", "run", "--users", "0"],
            &["loadtest", "run", "--prompt-mix", "tiny=1"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
