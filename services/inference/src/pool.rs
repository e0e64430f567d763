//! The loaded models: `--sessions` generators, each run by its own generation loop
//! ([`crate::generation`]), and the embedder and classifier behind mutexes.
use std::sync::{Arc, Mutex, PoisonError};

use millrace_engine::{ChatTemplate, Classifier, Embedder, EngineError, Generation, Manifest};
use tokenizers::Tokenizer;
use tracing::info;

use crate::config::InferenceConfig;
use crate::generation::GenerationLoops;
use crate::request::{Rejection, check_fit};

/// What became of one request of a job.
pub type Outcome = Result<Generation, Rejection>;

/// Everything this process serves, loaded once at start.
pub struct Engines {
    /// The generation model's manifest name and content version.
    pub model: String,
    pub model_version: String,
    /// Renders `Generate`'s chat messages; `None` when the manifest gives the model none.
    pub chat_template: Option<ChatTemplate>,
    /// The generation model's tokenizer and context, to check a prompt fits before queueing it.
    tokenizer: Tokenizer,
    context_length: usize,
    pub generation: Arc<GenerationLoops>,
    pub embedder: Option<Arc<Loaded<Embedder>>>,
    pub classifier: Option<Arc<Loaded<Classifier>>>,
}

impl Engines {
    /// Whether `prompt` can run with `max_new_tokens`, by the rule the engine enforces.
    pub fn check_fit(&self, prompt: &str, max_new_tokens: usize) -> Result<(), Rejection> {
        let tokens = self.tokenizer.encode(prompt, false).map_or(0, |e| e.len());
        check_fit(tokens, max_new_tokens, self.context_length)
    }

    /// Loads the manifest's models (slow: call from a blocking thread).
    pub fn load(config: &InferenceConfig) -> Result<Self, EngineError> {
        let manifest = Manifest::load(&config.models_dir)?;
        let options = config.runtime_options();
        let entry = manifest.model(&config.model)?;
        let chat_template = entry.chat_template.is_some().then(|| manifest.chat_template(&config.model)).transpose()?;
        let generators = (0..config.sessions.get())
            .map(|_| manifest.generator(&config.model, &options))
            .collect::<Result<Vec<_>, _>>()?;
        let tokenizer = generators[0].tokenizer().clone();
        let context_length = generators[0].spec().context_length;
        let sessions = generators.len();
        let embedder = config
            .embed_model()
            .map(|name| Loaded::open(&manifest, name, |m| m.embedder(name, &options)).map(Arc::new))
            .transpose()?;
        let classifier = config
            .classify_model()
            .map(|name| Loaded::open(&manifest, name, |m| m.classifier(name, &options)).map(Arc::new))
            .transpose()?;
        let scheduling = config.scheduler();
        let generation = GenerationLoops::start(generators, scheduling)?;
        info!(model = config.model, version = entry.version, sessions, ?scheduling, "generation model loaded");
        Ok(Self {
            model: config.model.clone(),
            model_version: entry.version.clone(),
            chat_template,
            tokenizer,
            context_length,
            generation,
            embedder,
            classifier,
        })
    }
}

/// A side model (embedder, classifier) shared by every call through a mutex.
pub struct Loaded<T> {
    pub name: String,
    pub version: String,
    engine: Mutex<T>,
}

impl<T> Loaded<T> {
    fn open(
        manifest: &Manifest,
        name: &str,
        open: impl FnOnce(&Manifest) -> Result<T, EngineError>,
    ) -> Result<Self, EngineError> {
        let version = manifest.model(name)?.version.clone();
        let engine = open(manifest)?;
        info!(model = name, version, "model loaded");
        Ok(Self { name: name.to_owned(), version, engine: Mutex::new(engine) })
    }

    /// Runs `f` on the model, waiting for the mutex (blocking: call from a blocking thread).
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // A call that panicked leaves no state behind in the session: the model stays usable.
        f(&mut self.engine.lock().unwrap_or_else(PoisonError::into_inner))
    }
}
