//! The moderator: the policy in force (swappable at run time) and the profanity classifier,
//! applied to one text at a time. [`Moderator::check_blocking`] is the synchronous core (for
//! tests and benches); [`Moderator::check`] runs it on a blocking thread.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use millrace_engine::{Classifier, EngineError, Manifest, RuntimeOptions};
use tracing::{error, info, warn};

use crate::normalize::normalize;
use crate::policy::{Decision, Policy, PolicyError, Stage};

#[derive(Debug, thiserror::Error)]
pub enum ModerationError {
    #[error("classifier: {0}")]
    Classifier(#[from] EngineError),
    #[error("moderation job: {0}")]
    Job(String),
}

/// The policy in force and where it comes from; replaced whole, never edited in place.
pub struct PolicyStore {
    current: RwLock<Arc<Policy>>,
    /// The policy file, or `None` for the shipped default.
    path: Option<PathBuf>,
    /// The file's (modification time, length) when it was last read.
    seen: Mutex<Option<(SystemTime, u64)>>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// A new policy is in force (its version).
    Replaced(String),
    /// The file's content is the policy already in force.
    Unchanged,
}

impl PolicyStore {
    /// The policy from `path`, or the shipped default when none is given.
    pub fn open(path: Option<&Path>) -> Result<Self, PolicyError> {
        let seen = path.and_then(file_stamp);
        let policy = match path {
            Some(p) => Policy::load(p)?,
            None => Policy::default_policy(),
        };
        Ok(Self { current: RwLock::new(Arc::new(policy)), path: path.map(Path::to_owned), seen: Mutex::new(seen) })
    }

    /// A store holding `policy`, with no file behind it.
    pub fn fixed(policy: Policy) -> Self {
        Self { current: RwLock::new(Arc::new(policy)), path: None, seen: Mutex::new(None) }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Reads the file again; a policy that does not parse or validate is refused and the one in
    /// force stays.
    pub fn reload(&self) -> Result<Reloaded, PolicyError> {
        let Some(path) = &self.path else { return Ok(Reloaded::Unchanged) };
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = file_stamp(path);
        let policy = Policy::load(path)?;
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if policy.version() == current.version() {
            return Ok(Reloaded::Unchanged);
        }
        let version = policy.version().to_owned();
        *current = Arc::new(policy);
        Ok(Reloaded::Replaced(version))
    }

    /// Whether the file's modification time or length differs from when it was last read.
    pub fn file_changed(&self) -> bool {
        let Some(path) = &self.path else { return false };
        file_stamp(path) != *self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reloads and logs the outcome in one line; `why` says what prompted it.
    pub fn reload_and_log(&self, why: &str) {
        let path = self.path.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
        match self.reload() {
            Ok(Reloaded::Replaced(version)) => info!(%path, version, why, "policy reloaded"),
            Ok(Reloaded::Unchanged) => info!(%path, version = self.current().version(), why, "policy unchanged"),
            Err(e) => error!(
                %path,
                error = %e,
                kept_version = self.current().version(),
                why,
                "policy refused; the previous policy stays in force"
            ),
        }
    }
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// A few classifier sessions (an ONNX Runtime session runs with `&mut`), each behind a mutex;
/// a call takes a free one, or waits for one in turn.
pub struct ClassifierPool {
    sessions: Vec<Mutex<Classifier>>,
    next: AtomicUsize,
    pub version: String,
}

impl ClassifierPool {
    /// Opens `sessions` sessions of the manifest's classifier `name` (slow: a blocking thread).
    pub fn load(models_dir: &Path, name: &str, sessions: usize, intra_threads: usize) -> Result<Self, EngineError> {
        let manifest = Manifest::load(models_dir)?;
        let version = manifest.model(name)?.version.clone();
        let options = RuntimeOptions { intra_threads, ..Default::default() };
        let sessions = (0..sessions.max(1))
            .map(|_| manifest.classifier(name, &options).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        info!(model = name, version, sessions = sessions.len(), "classifier loaded");
        Ok(Self { sessions, next: AtomicUsize::new(0), version })
    }

    /// The profanity probability of each text (blocking).
    pub fn scores(&self, texts: &[&str]) -> Result<Vec<f32>, EngineError> {
        for session in &self.sessions {
            if let Ok(mut c) = session.try_lock() {
                return c.scores(texts);
            }
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.sessions.len();
        // A call that panicked leaves no state behind in the session: it stays usable.
        self.sessions[turn].lock().unwrap_or_else(PoisonError::into_inner).scores(texts)
    }
}

/// The policy and the classifier together.
#[derive(Clone)]
pub struct Moderator {
    pub policy: Arc<PolicyStore>,
    pub classifier: Option<Arc<ClassifierPool>>,
}

impl Moderator {
    pub fn new(policy: Arc<PolicyStore>, classifier: Option<Arc<ClassifierPool>>) -> Self {
        if classifier.is_none() {
            let p = policy.current();
            if p.uses_classifier(Stage::Input) || p.uses_classifier(Stage::Output) {
                warn!("the classifier is disabled: the policy's classifier thresholds are ignored");
            }
        }
        Self { policy, classifier }
    }

    /// Checks one text against the policy in force (CPU work: call from a blocking thread).
    pub fn check_blocking(&self, text: &str, stage: Stage) -> Result<Decision, ModerationError> {
        self.check_under(&self.policy.current(), text, stage)
    }

    /// Checks one text against `policy` (blocking).
    pub fn check_under(&self, policy: &Policy, text: &str, stage: Stage) -> Result<Decision, ModerationError> {
        let normalized = normalize(text);
        let score = match &self.classifier {
            Some(classifier) if policy.uses_classifier(stage) => {
                // The de-obfuscated words: the classifier only knows plainly spelled words.
                Some(classifier.scores(&[normalized.joined.as_str()])?[0])
            }
            _ => None,
        };
        Ok(policy.evaluate(&normalized, stage, score))
    }

    /// Checks one text on a blocking thread; returns the decision with the policy it was made
    /// under (whose refusal text a block uses).
    pub async fn check(&self, text: String, stage: Stage) -> Result<(Decision, Arc<Policy>), ModerationError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let policy = this.policy.current();
            let decision = this.check_under(&policy, &text, stage)?;
            Ok((decision, policy))
        })
        .await
        .map_err(|e| ModerationError::Job(e.to_string()))?
    }
}
