//! The moderation service's configuration: every flag also reads its `MILLRACE_…` env var.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use millrace_runtime::ShellArgs;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "moderation",
    about = "Millrace moderation: CLEAN → ADMITTED and COMPLETIONS → RESULTS, and gRPC Check"
)]
pub struct ModerationConfig {
    /// Policy file (TOML); without one the shipped default policy is in force.
    #[arg(long, env = "MILLRACE_MODERATION_POLICY")]
    pub policy: Option<PathBuf>,
    /// How often the policy file's modification time is checked, milliseconds (0 = only SIGHUP
    /// reloads it).
    #[arg(long, env = "MILLRACE_MODERATION_POLICY_POLL_MS", default_value_t = 1000)]
    pub policy_poll_ms: u64,
    /// Folder holding `manifest.json` (written by `scripts/prepare-models.sh`).
    #[arg(long, env = "MILLRACE_MODELS_DIR", default_value = "models/prepared")]
    pub models_dir: PathBuf,
    /// The profanity classifier (a manifest name); empty disables it (rules only).
    #[arg(long, env = "MILLRACE_MODERATION_CLASSIFIER", default_value = "profanity")]
    pub classifier: String,
    /// Classifier sessions in this process: how many texts are scored at once.
    #[arg(long, env = "MILLRACE_MODERATION_CLASSIFIER_SESSIONS", default_value_t = 2)]
    pub classifier_sessions: usize,
    /// Intra-op threads per classifier session (0 = ONNX Runtime's choice).
    #[arg(long, env = "MILLRACE_MODERATION_INTRA_THREADS", default_value_t = 1)]
    pub intra_threads: usize,
    /// gRPC `millrace.v1.Moderation` and health.
    #[arg(long, env = "MILLRACE_MODERATION_GRPC_ADDR", default_value = "127.0.0.1:50053")]
    pub grpc_addr: SocketAddr,
    #[command(flatten)]
    pub shell: ShellArgs,
}

impl ModerationConfig {
    pub const ADMIN_PORT: u16 = 9182;

    /// The classifier, unless disabled.
    pub fn classifier(&self) -> Option<&str> {
        Some(self.classifier.as_str()).filter(|m| !m.is_empty())
    }

    /// How often to look at the policy file, unless only SIGHUP reloads it.
    pub fn policy_poll(&self) -> Option<Duration> {
        (self.policy_poll_ms > 0).then(|| Duration::from_millis(self.policy_poll_ms))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_and_switches() {
        let c = ModerationConfig::parse_from(["moderation"]);
        assert_eq!((c.policy.as_deref(), c.classifier(), c.classifier_sessions), (None, Some("profanity"), 2));
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50053");
        assert_eq!(c.policy_poll(), Some(Duration::from_secs(1)));
        let c =
            ModerationConfig::parse_from(["moderation", "--policy=/etc/p.toml", "--classifier=", "--policy-poll-ms=0"]);
        assert_eq!(c.policy.as_deref(), Some(std::path::Path::new("/etc/p.toml")));
        assert_eq!((c.classifier(), c.policy_poll()), (None, None));
    }
}
