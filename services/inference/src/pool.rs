//! The loaded models: `--sessions` generators, each lent to one blocking job at a time (an ONNX
//! Runtime session runs with `&mut`), and the embedder and classifier behind mutexes.
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use millrace_engine::{
    ChatTemplate, Classifier, Embedder, EngineError, FinishReason, Generation, GenerationRequest, Generator, Manifest,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::info;

use crate::config::InferenceConfig;
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
    pub generators: Arc<GeneratorPool>,
    pub embedder: Option<Arc<Loaded<Embedder>>>,
    pub classifier: Option<Arc<Loaded<Classifier>>>,
}

impl Engines {
    /// Loads the manifest's models (slow: call from a blocking thread).
    pub fn load(config: &InferenceConfig) -> Result<Self, EngineError> {
        let manifest = Manifest::load(&config.models_dir)?;
        let options = config.runtime_options();
        let entry = manifest.model(&config.model)?;
        let chat_template = entry.chat_template.is_some().then(|| manifest.chat_template(&config.model)).transpose()?;
        let generators = (0..config.sessions.get())
            .map(|_| manifest.generator(&config.model, &options))
            .collect::<Result<Vec<_>, _>>()?;
        let embedder = config
            .embed_model()
            .map(|name| Loaded::open(&manifest, name, |m| m.embedder(name, &options)).map(Arc::new))
            .transpose()?;
        let classifier = config
            .classify_model()
            .map(|name| Loaded::open(&manifest, name, |m| m.classifier(name, &options)).map(Arc::new))
            .transpose()?;
        info!(model = config.model, version = entry.version, sessions = generators.len(), "generation model loaded");
        Ok(Self {
            model: config.model.clone(),
            model_version: entry.version.clone(),
            chat_template,
            generators: GeneratorPool::new(generators),
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

/// Idle generators; a semaphore permit stands for each, so a checkout never finds the list empty.
pub struct GeneratorPool {
    idle: Mutex<Vec<Generator>>,
    free: Arc<Semaphore>,
}

impl GeneratorPool {
    pub fn new(generators: Vec<Generator>) -> Arc<Self> {
        let free = Arc::new(Semaphore::new(generators.len()));
        Arc::new(Self { idle: Mutex::new(generators), free })
    }

    /// Waits for a free generator (batches from the bus wait their turn).
    pub async fn checkout(self: &Arc<Self>) -> Lease {
        let permit = self.free.clone().acquire_owned().await.expect("the pool's semaphore is never closed");
        self.lease(permit)
    }

    /// A free generator now, or none: direct calls fail fast instead of queueing unboundedly
    /// behind the bus (as HuggingFace TEI answers `overloaded`). They never overtake a waiting
    /// batch: the semaphore hands a released permit to its oldest waiter.
    pub fn try_checkout(self: &Arc<Self>) -> Option<Lease> {
        self.free.clone().try_acquire_owned().ok().map(|permit| self.lease(permit))
    }

    fn lease(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Lease {
        let generator = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        Lease {
            generator: Some(generator.expect("a permit stands for an idle generator")),
            pool: self.clone(),
            _permit: permit,
        }
    }
}

/// A generator checked out of the pool; it goes back when the lease drops (a panicking job
/// included), before its permit is released.
pub struct Lease {
    generator: Option<Generator>,
    pool: Arc<GeneratorPool>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(generator) = self.generator.take() {
            self.pool.idle.lock().unwrap_or_else(PoisonError::into_inner).push(generator);
        }
    }
}

impl Lease {
    /// Generates every request that can run, together, streaming `on_token(i, piece)` for
    /// request `i`. The others are answered without compute: already cancelled or past their
    /// deadline (a `Cancelled`/`Deadline` generation with no tokens), or rejected — one bad
    /// prompt must not fail the batch it came in. Blocking: call from a blocking thread.
    pub fn run(
        &mut self,
        requests: Vec<GenerationRequest>,
        mut on_token: impl FnMut(usize, &str),
    ) -> Result<Vec<Outcome>, EngineError> {
        let generator = self.generator.as_mut().expect("held until the lease drops");
        let context = generator.spec().context_length;
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(requests.len());
        let (mut runnable, mut batch) = (Vec::new(), Vec::new());
        for (i, request) in requests.into_iter().enumerate() {
            if let Some(finish) = finished_before_start(&request) {
                outcomes.push(Some(Ok(not_started(finish))));
                continue;
            }
            match check_fit(generator.encode(&request.prompt)?.len(), request.max_new_tokens, context) {
                Ok(()) => {
                    runnable.push(i);
                    batch.push(request);
                    outcomes.push(None);
                }
                Err(rejection) => outcomes.push(Some(Err(rejection))),
            }
        }
        let generations = generator.generate(&batch, |b, piece| on_token(runnable[b], piece))?;
        for (i, generation) in runnable.into_iter().zip(generations) {
            outcomes[i] = Some(Ok(generation));
        }
        Ok(outcomes.into_iter().map(|o| o.expect("every request has an outcome")).collect())
    }
}

fn finished_before_start(request: &GenerationRequest) -> Option<FinishReason> {
    if request.cancel.load(Ordering::Relaxed) {
        Some(FinishReason::Cancelled)
    } else if request.deadline.is_some_and(|d| Instant::now() >= d) {
        Some(FinishReason::Deadline)
    } else {
        None
    }
}

fn not_started(finish: FinishReason) -> Generation {
    Generation {
        text: String::new(),
        token_ids: Vec::new(),
        prompt_tokens: 0,
        finish,
        refusal: None,
        logprobs: Vec::new(),
    }
}
