//! The preprocess service's configuration: every flag also reads its `MILLRACE_…` env var.
use std::path::PathBuf;

use millrace_runtime::ShellArgs;

use crate::clean::{Overflow, Policy};
use crate::pii::Detectors;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "preprocess",
    about = "Millrace preprocess: QUERIES into CLEAN (normalize, validate, count tokens, redact PII)"
)]
pub struct PreprocessConfig {
    /// Folder holding `manifest.json` (written by `scripts/prepare-models.sh`); every generation
    /// model in it is a valid target, counted with its own tokenizer.
    #[arg(long, env = "MILLRACE_MODELS_DIR", default_value = "models/prepared")]
    pub models_dir: PathBuf,
    /// Longest text accepted, in characters (Unicode scalar values) after normalization.
    #[arg(long, env = "MILLRACE_PREPROCESS_MAX_CHARS", default_value_t = 8000)]
    pub max_chars: usize,
    /// Tokens of the model's context kept free for the chat template and the answer: the
    /// text's budget is context length − this.
    #[arg(long, env = "MILLRACE_PREPROCESS_RESERVE_TOKENS", default_value_t = 512)]
    pub reserve_tokens: usize,
    /// Past the token budget: reject (REJECTED `too_many_tokens`) or truncate to the budget.
    #[arg(long, env = "MILLRACE_PREPROCESS_OVERFLOW", value_enum, default_value_t = Overflow::Reject)]
    pub overflow: Overflow,
    /// PII detectors to run: `all`, `none`, or a comma-separated list of
    /// email, phone, card, ipv4, ipv6, iban, ssn.
    #[arg(long, env = "MILLRACE_PREPROCESS_REDACT", default_value = "all")]
    pub redact: Detectors,
    #[command(flatten)]
    pub shell: ShellArgs,
}

impl PreprocessConfig {
    pub const ADMIN_PORT: u16 = 9181;

    pub fn policy(&self) -> Policy {
        Policy {
            max_chars: self.max_chars,
            reserve_tokens: self.reserve_tokens,
            overflow: self.overflow,
            detectors: self.redact,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::pii::PiiKind;

    #[test]
    fn defaults_and_overrides() {
        let c = PreprocessConfig::parse_from(["preprocess"]);
        let p = c.policy();
        assert_eq!((p.max_chars, p.reserve_tokens, p.overflow), (8000, 512, Overflow::Reject));
        assert_eq!(p.detectors, Detectors::ALL);
        assert_eq!(c.models_dir, PathBuf::from("models/prepared"));
        let c =
            PreprocessConfig::parse_from(["preprocess", "--overflow=truncate", "--redact=email,ssn", "--max-chars=10"]);
        let p = c.policy();
        assert_eq!((p.max_chars, p.overflow), (10, Overflow::Truncate));
        assert_eq!(p.detectors, Detectors::of(&[PiiKind::Email, PiiKind::Ssn]));
        assert_eq!(PreprocessConfig::parse_from(["preprocess", "--redact="]).redact, Detectors::NONE);
        assert!(PreprocessConfig::try_parse_from(["preprocess", "--overflow=drop"]).is_err());
        assert!(PreprocessConfig::try_parse_from(["preprocess", "--redact=email,passport"]).is_err());
    }
}
