//! The session service's configuration: every flag also reads its `MILLRACE_…` env var.
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use millrace_runtime::ShellArgs;

use crate::prompt::PromptPolicy;
use crate::store::CasRetry;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "session", about = "Millrace session: conversation state, prompts and per-user rate limits")]
pub struct SessionConfig {
    /// Folder holding `manifest.json` (chat templates, tokenizers, context lengths).
    #[arg(long, env = "MILLRACE_MODELS_DIR", default_value = "models/prepared")]
    pub models_dir: PathBuf,
    /// Completed turns (user + assistant exchanges) kept per conversation; older ones are
    /// forgotten.
    #[arg(long, env = "MILLRACE_SESSION_MAX_TURNS", default_value = "10")]
    pub max_turns: NonZeroUsize,
    /// A conversation not written for this long is forgotten, seconds (the KV bucket's max age;
    /// every write — a query's pending turn, a stored answer — starts it again).
    #[arg(long, env = "MILLRACE_SESSION_IDLE_TTL_S", default_value = "1800")]
    pub idle_ttl_s: NonZeroU64,
    /// System message opening every prompt; empty for none (the template may add its own).
    #[arg(
        long,
        env = "MILLRACE_SESSION_SYSTEM_PROMPT",
        default_value = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )]
    pub system_prompt: String,
    /// Tokens of the context window kept free for the answer: the prompt (history trimmed,
    /// oldest first) fits in `context_length − reserve_tokens`.
    #[arg(long, env = "MILLRACE_SESSION_RESERVE_TOKENS", default_value_t = 512)]
    pub reserve_tokens: usize,
    /// Queries per second per (tenant, user) in this replica (token bucket refill); 0 turns the
    /// limit off. Each replica enforces its own share.
    #[arg(long, env = "MILLRACE_SESSION_RATE_PER_S", default_value_t = 5.0)]
    pub rate_per_s: f64,
    /// Token bucket size: queries a quiet user may send at once.
    #[arg(long, env = "MILLRACE_SESSION_BURST", default_value = "10")]
    pub burst: NonZeroU32,
    /// The JetStream KV bucket holding the conversations.
    #[arg(long, env = "MILLRACE_SESSION_BUCKET", default_value = "MR_SESSIONS")]
    pub bucket: String,
    /// Compare-and-set writes tried per change before the message is handed back.
    #[arg(long, env = "MILLRACE_SESSION_CAS_ATTEMPTS", default_value = "16")]
    pub cas_attempts: NonZeroU32,
    /// gRPC `millrace.v1.Sessions` and health.
    #[arg(long, env = "MILLRACE_SESSION_GRPC_ADDR", default_value = "127.0.0.1:50054")]
    pub grpc_addr: SocketAddr,
    #[command(flatten)]
    pub shell: ShellArgs,
}

impl SessionConfig {
    pub const ADMIN_PORT: u16 = 9183;

    pub fn idle_ttl(&self) -> Duration {
        Duration::from_secs(self.idle_ttl_s.get())
    }

    pub fn prompt_policy(&self) -> PromptPolicy {
        PromptPolicy {
            system_prompt: Some(self.system_prompt.clone()).filter(|s| !s.is_empty()),
            reserve_tokens: self.reserve_tokens,
        }
    }

    pub fn cas_retry(&self) -> CasRetry {
        CasRetry { attempts: self.cas_attempts.get(), ..CasRetry::default() }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let c = SessionConfig::parse_from(["session"]);
        assert_eq!((c.max_turns.get(), c.idle_ttl(), c.reserve_tokens), (10, Duration::from_secs(1800), 512));
        assert_eq!((c.rate_per_s, c.burst.get(), c.bucket.as_str()), (5.0, 10, "MR_SESSIONS"));
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50054");
        assert_eq!(
            c.prompt_policy().system_prompt.as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        assert_eq!(c.cas_retry(), CasRetry::default());
        let c = SessionConfig::parse_from(["session", "--system-prompt=", "--rate-per-s=0", "--idle-ttl-s=2"]);
        assert_eq!((c.prompt_policy().system_prompt, c.rate_per_s, c.idle_ttl()), (None, 0.0, Duration::from_secs(2)));
        for bad in ["--max-turns=0", "--idle-ttl-s=0", "--burst=0", "--cas-attempts=0", "--reserve-tokens=-1"] {
            assert!(SessionConfig::try_parse_from(["session", bad]).is_err(), "{bad}");
        }
    }
}
