//! Flags (each also read from a `MILLRACE_CHAOS_…` variable) and the plan they resolve to: a
//! schedule's defaults with whatever the flags override.
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

/// The chaos suite's command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "chaos",
    about = "Millrace chaos suite: the mesh under load and faults, then the ledger and duplicate-effect checks"
)]
pub struct Config {
    /// Fault schedule: `short` (CI, a few minutes), `full` (longer gaps, higher rate, 60 s
    /// outage) or `cluster` (NATS as three Docker containers with R3 streams: `docker kill` of
    /// the node leading the most streams, then a network partition of one node, then healed).
    #[arg(long, env = "MILLRACE_CHAOS_SCHEDULE", value_enum, default_value_t = Schedule::Short)]
    pub schedule: Schedule,
    /// The model inference serves (prepared under the models folder): `tiny-llama` or `smollm2-135m`.
    #[arg(long, env = "MILLRACE_CHAOS_MODEL", default_value = "tiny-llama")]
    pub model: String,
    /// Report folder (report.json, report.md, logs, the JetStream store, the SQLite file);
    /// default `target/chaos/<run id>`.
    #[arg(long, env = "MILLRACE_CHAOS_OUT")]
    pub out: Option<PathBuf>,
    /// Offered load, logical requests per second (default: the schedule's).
    #[arg(long, env = "MILLRACE_CHAOS_RATE")]
    pub rate: Option<f64>,
    /// Arrival process: Poisson (exponential gaps) or constant gaps.
    #[arg(long, env = "MILLRACE_CHAOS_ARRIVALS", value_enum, default_value_t = Arrivals::Poisson)]
    pub arrivals: Arrivals,
    /// Seed of the arrivals, texts and poison bytes (default: from the clock).
    #[arg(long, env = "MILLRACE_CHAOS_SEED")]
    pub seed: Option<u64>,
    /// Distinct users the load is spread over (the session rate limit is per user).
    #[arg(long, env = "MILLRACE_CHAOS_USERS")]
    pub users: Option<usize>,
    /// New tokens per request (`ignore_eos`, so each generates exactly this many).
    #[arg(long, env = "MILLRACE_CHAOS_MAX_NEW_TOKENS")]
    pub max_new_tokens: Option<u32>,
    /// Deadline each request asks for, milliseconds.
    #[arg(long, env = "MILLRACE_CHAOS_DEADLINE_MS", default_value_t = 120_000)]
    pub deadline_ms: u32,
    /// Ack wait of every stage, seconds (`--ack-wait-s` of every service); the SIGSTOP fault
    /// lasts twice this.
    #[arg(long, env = "MILLRACE_CHAOS_ACK_WAIT_S", default_value_t = 5)]
    pub ack_wait_s: u64,
    /// Per-stream message limit of the mesh (`--stream-max-msgs`), small so an outage fills
    /// the streams and ingest answers 429 (default: the schedule's).
    #[arg(long, env = "MILLRACE_CHAOS_STREAM_MAX_MSGS")]
    pub stream_max_msgs: Option<i64>,
    /// Pause between faults after recovery, seconds (default: the schedule's).
    #[arg(long, env = "MILLRACE_CHAOS_GAP_S")]
    pub gap_s: Option<f64>,
    /// How long a killed process stays down before its restart, seconds.
    #[arg(long, env = "MILLRACE_CHAOS_DOWN_S")]
    pub down_s: Option<f64>,
    /// How long the `cluster` schedule keeps one NATS node cut off the network, seconds.
    #[arg(long, env = "MILLRACE_CHAOS_PARTITION_S", default_value_t = 15.0)]
    pub partition_s: f64,
    /// How long the sink's database stays locked, seconds (default: the schedule's).
    #[arg(long, env = "MILLRACE_CHAOS_DB_LOCK_S")]
    pub db_lock_s: Option<f64>,
    /// How long the downstream outage lasts, seconds (default: the schedule's).
    #[arg(long, env = "MILLRACE_CHAOS_OUTAGE_S")]
    pub outage_s: Option<f64>,
    /// The stage stopped (SIGSTOP) for the outage: a service label such as `preprocess`,
    /// `sink` or `inference-1` (default: the schedule's).
    #[arg(long, env = "MILLRACE_CHAOS_OUTAGE_STAGE")]
    pub outage_stage: Option<String>,
    /// Requests one user sends at once after the warm-up, past the session's per-user rate
    /// limit, so some end RATE_LIMITED before the broker restart (0: none).
    #[arg(long, env = "MILLRACE_CHAOS_RATE_LIMITED_BURST", default_value_t = 20)]
    pub rate_limited_burst: usize,
    /// Keys accepted before the broker restart that are submitted again after it (up to half
    /// of them RATE_LIMITED ones, the rest spread over the run).
    #[arg(long, env = "MILLRACE_CHAOS_RESUBMIT")]
    pub resubmit: Option<usize>,
    /// How long the client keeps retrying one submit before giving up, seconds.
    #[arg(long, env = "MILLRACE_CHAOS_GIVE_UP_S", default_value_t = 60.0)]
    pub give_up_s: f64,
    /// Longest wait for a fault's recovery (ready again, then a completion), seconds.
    #[arg(long, env = "MILLRACE_CHAOS_RECOVERY_TIMEOUT_S", default_value_t = 90.0)]
    pub recovery_timeout_s: f64,
    /// Recovery target: from ready (or the fault's end) to the first completion of a request
    /// sent after it, seconds; slower recoveries are marked as misses.
    #[arg(long, env = "MILLRACE_CHAOS_RECOVERY_TARGET_S", default_value_t = 5.0)]
    pub recovery_target_s: f64,
    /// Longest wait, after the load stops, for every accepted request's terminal row, seconds.
    #[arg(long, env = "MILLRACE_CHAOS_DRAIN_S", default_value_t = 180.0)]
    pub drain_s: f64,
    /// Only these faults, in schedule order (comma-separated: kill-sink, kill-inference,
    /// kill-batcher, kill-session, kill-moderation, kill-preprocess, kill-ingest, kill-nats,
    /// sigstop-inference, poison, db-lock, outage; in the `cluster` schedule: kill-stream-leader,
    /// partition).
    #[arg(long, env = "MILLRACE_CHAOS_ONLY", value_delimiter = ',')]
    pub only: Vec<String>,
    /// Folder of the service binaries (default: beside this binary, or target/debug for tests).
    #[arg(long, env = "MILLRACE_CHAOS_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Folder of the prepared models (default: the workspace's models/prepared).
    #[arg(long, env = "MILLRACE_CHAOS_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Short,
    Full,
    /// NATS as a three-node cluster of containers; the faults are a node's.
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrivals {
    Poisson,
    Constant,
}

/// One fault of the schedule.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// `kill -9` of a service (by label), restarted with the same flags on the same addresses.
    Kill { target: String },
    /// `kill -9` of nats-server, restarted on the same store and client port; then keys
    /// accepted before it are submitted again.
    KillNats,
    /// SIGSTOP of an inference replica for twice the ack wait, then SIGCONT.
    Stall { target: String, secs: f64 },
    /// An undecodable message into every edge stream.
    Poison,
    /// An exclusive lock on the sink's SQLite file for `secs`.
    DbLock { secs: f64 },
    /// A stage stopped (SIGSTOP) for `secs` while load goes on; RSS sampled throughout.
    Outage { target: String, secs: f64 },
    /// `docker kill` of the NATS container leading the most streams, `docker start` after
    /// `down_s`; then keys accepted before it are submitted again (`cluster` schedule).
    KillLeader,
    /// `docker network disconnect` of one NATS container (the one leading the most streams) for
    /// `secs`, then `docker network connect` (`cluster` schedule).
    Partition { secs: f64 },
}

impl Fault {
    /// The name `--only` selects it by and the report shows.
    pub fn name(&self) -> String {
        match self {
            Fault::Kill { target } => {
                format!("kill-{}", target.trim_end_matches(|c: char| c == '-' || c.is_ascii_digit()))
            }
            Fault::KillNats => "kill-nats".into(),
            Fault::Stall { .. } => "sigstop-inference".into(),
            Fault::Poison => "poison".into(),
            Fault::DbLock { .. } => "db-lock".into(),
            Fault::Outage { .. } => "outage".into(),
            Fault::KillLeader => "kill-stream-leader".into(),
            Fault::Partition { .. } => "partition".into(),
        }
    }
}

/// What a run does, every default resolved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub schedule: Schedule,
    pub model: String,
    pub rate: f64,
    pub arrivals: Arrivals,
    pub seed: u64,
    pub users: usize,
    pub max_new_tokens: u32,
    pub deadline_ms: u32,
    pub ack_wait_s: u64,
    pub stream_max_msgs: i64,
    pub gap_s: f64,
    pub down_s: f64,
    pub warmup_s: f64,
    pub tail_s: f64,
    pub resubmit: usize,
    pub rate_limited_burst: usize,
    pub give_up_s: f64,
    pub recovery_timeout_s: f64,
    pub recovery_target_s: f64,
    pub drain_s: f64,
    pub faults: Vec<Fault>,
}

/// The service labels killed one by one, one inference replica among them.
pub const KILLED: [&str; 7] = ["sink", "inference-1", "batcher", "session", "moderation", "preprocess", "ingest"];

impl Plan {
    pub fn new(config: &Config) -> anyhow::Result<Plan> {
        let full = config.schedule == Schedule::Full;
        let pick = |value: Option<f64>, short: f64, long: f64| value.unwrap_or(if full { long } else { short });
        let ack_wait_s = config.ack_wait_s.max(1);
        let outage_stage =
            config.outage_stage.clone().unwrap_or_else(|| (if full { "sink" } else { "preprocess" }).into());
        let cluster = config.schedule == Schedule::Cluster;
        let mut faults: Vec<Fault> = KILLED.iter().map(|t| Fault::Kill { target: (*t).into() }).collect();
        faults.extend([
            Fault::KillNats,
            Fault::Stall { target: "inference-2".into(), secs: 2.0 * ack_wait_s as f64 },
            Fault::Poison,
            Fault::DbLock { secs: pick(config.db_lock_s, 6.0, 20.0) },
            Fault::Outage { target: outage_stage, secs: pick(config.outage_s, 10.0, 60.0) },
        ]);
        if cluster {
            faults = vec![Fault::KillLeader, Fault::Partition { secs: config.partition_s }];
        }
        if !config.only.is_empty() {
            let known: Vec<String> = faults.iter().map(Fault::name).collect();
            if let Some(unknown) = config.only.iter().find(|name| !known.contains(name)) {
                anyhow::bail!("--only: no fault named {unknown:?}; known: {}", known.join(", "));
            }
            faults.retain(|fault| config.only.contains(&fault.name()));
        }
        let seed = config.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(Plan {
            schedule: config.schedule,
            model: config.model.clone(),
            rate: pick(config.rate, 4.0, 10.0),
            arrivals: config.arrivals,
            seed,
            users: config.users.unwrap_or(if full { 200 } else { 40 }),
            max_new_tokens: config.max_new_tokens.unwrap_or(32),
            deadline_ms: config.deadline_ms,
            ack_wait_s,
            stream_max_msgs: config.stream_max_msgs.unwrap_or(if full { 64 } else { 32 }),
            gap_s: pick(config.gap_s, 2.0, 10.0),
            // A cluster node stays down long enough for its streams to elect other leaders.
            down_s: config.down_s.unwrap_or(if cluster {
                10.0
            } else if full {
                3.0
            } else {
                1.0
            }),
            warmup_s: if full { 10.0 } else { 3.0 },
            tail_s: if full { 10.0 } else { 3.0 },
            resubmit: config.resubmit.unwrap_or(if full { 50 } else { 12 }),
            rate_limited_burst: config.rate_limited_burst,
            give_up_s: config.give_up_s,
            recovery_timeout_s: config.recovery_timeout_s,
            recovery_target_s: config.recovery_target_s,
            drain_s: config.drain_s,
            faults,
        })
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_s)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn the_short_schedule_has_every_fault_once_in_order() {
        let plan = Plan::new(&Config::parse_from(["chaos"])).unwrap();
        let names: Vec<String> = plan.faults.iter().map(Fault::name).collect();
        assert_eq!(
            names,
            [
                "kill-sink",
                "kill-inference",
                "kill-batcher",
                "kill-session",
                "kill-moderation",
                "kill-preprocess",
                "kill-ingest",
                "kill-nats",
                "sigstop-inference",
                "poison",
                "db-lock",
                "outage"
            ]
        );
        assert_eq!(plan.faults[8], Fault::Stall { target: "inference-2".into(), secs: 10.0 });
        assert_eq!(plan.model, "tiny-llama");
    }

    #[test]
    fn only_selects_faults_and_rejects_unknown_names() {
        let plan = Plan::new(&Config::parse_from(["chaos", "--only=kill-nats,poison", "--schedule=full"])).unwrap();
        assert_eq!(plan.faults, [Fault::KillNats, Fault::Poison]);
        assert_eq!(plan.rate, 10.0);
        assert!(Plan::new(&Config::parse_from(["chaos", "--only=kill-everything"])).is_err());
    }

    #[test]
    fn the_cluster_schedule_kills_the_leader_then_partitions_a_node() {
        let plan = Plan::new(&Config::parse_from(["chaos", "--schedule=cluster"])).unwrap();
        assert_eq!(plan.faults, [Fault::KillLeader, Fault::Partition { secs: 15.0 }]);
        assert_eq!(plan.down_s, 10.0);
        let plan = Plan::new(&Config::parse_from(["chaos", "--schedule=cluster", "--only=partition"])).unwrap();
        assert_eq!(plan.faults, [Fault::Partition { secs: 15.0 }]);
    }
}
