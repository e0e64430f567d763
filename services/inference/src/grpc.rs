//! gRPC `millrace.v1.Inference`: direct `Generate` (server-streaming), `Embed` and `Classify`,
//! outside the mesh. `Generate` joins the generation loops' running set like a bus request, or
//! fails fast with `overloaded` while as many requests wait for admission as can run at once.
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::Stream;
use millrace_engine::{ChatMessage, EngineError};
use millrace_proto::v1::inference_server::Inference;
use millrace_proto::v1::{
    ChatTurn, ClassifyRequest, ClassifyResponse, EmbedRequest, EmbedResponse, Embedding, GenerateChunk, GenerateRequest,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::error::{ApiError, MAX_TEXTS};
use crate::generation::Update;
use crate::pool::{Engines, Loaded, Outcome};
use crate::request::{Defaults, Rejection, check_model, generation_request};

pub struct InferenceApi {
    pub engines: Arc<Engines>,
    pub defaults: Defaults,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceApi {
    type GenerateStream = ChunkStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<ChunkStream>, Status> {
        let GenerateRequest { model, prompt, messages, params, deadline_ms } = request.into_inner();
        check_model(&model, &self.engines.model).map_err(ApiError::from)?;
        let prompt = self.prompt_of(prompt, messages)?;
        let deadline = (deadline_ms != 0).then(|| Instant::now() + Duration::from_millis(deadline_ms.into()));
        let cancel = Arc::new(AtomicBool::new(false));
        // No request id to derive a seed from: an unseeded direct call samples afresh each time.
        let request =
            generation_request(prompt, params.as_ref(), self.defaults, rand::random(), deadline, cancel.clone());
        self.engines.check_fit(&request.prompt, request.max_new_tokens).map_err(ApiError::from)?;
        let load = self.engines.generation.load();
        if load.waiting >= load.max_running {
            return Err(ApiError::Overloaded { waiting: load.waiting, running: load.running }.into());
        }
        let (chunks, received) = mpsc::unbounded_channel();
        let updates = self.engines.generation.submit(request);
        spawn_generation(updates, self.engines.model_version.clone(), chunks);
        let stream = futures::stream::unfold((received, CancelOnDrop(cancel)), |(mut received, guard)| async move {
            received.recv().await.map(|chunk| (chunk, (received, guard)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        let EmbedRequest { model, texts } = request.into_inner();
        let embedder = side_model(self.engines.embedder.as_ref(), "embeddings", &model, &texts)?;
        let (model, model_version) = (embedder.name.clone(), embedder.version.clone());
        let embedded = blocking(move || embedder.with(|e| e.embed(&as_strs(&texts)))).await?;
        let embeddings = embedded.into_iter().map(|e| Embedding { values: e.vector, tokens: e.tokens }).collect();
        Ok(Response::new(EmbedResponse { embeddings, model_version, model }))
    }

    async fn classify(&self, request: Request<ClassifyRequest>) -> Result<Response<ClassifyResponse>, Status> {
        let ClassifyRequest { model, texts } = request.into_inner();
        let classifier = side_model(self.engines.classifier.as_ref(), "classification", &model, &texts)?;
        let model_version = classifier.version.clone();
        let scores = blocking(move || classifier.with(|c| c.scores(&as_strs(&texts)))).await?;
        Ok(Response::new(ClassifyResponse { scores, model_version }))
    }
}

impl InferenceApi {
    /// The prompt itself, or the chat messages rendered with the model's template (the
    /// assistant's turn opened).
    fn prompt_of(&self, prompt: String, messages: Vec<ChatTurn>) -> Result<String, ApiError> {
        match (prompt.is_empty(), messages.is_empty()) {
            (false, false) => Err(ApiError::PromptAndMessages),
            (true, true) => Err(Rejection::EmptyPrompt.into()),
            (false, true) => Ok(prompt),
            (true, false) => {
                let template = self
                    .engines
                    .chat_template
                    .as_ref()
                    .ok_or_else(|| ApiError::NoChatTemplate(self.engines.model.clone()))?;
                let messages: Vec<ChatMessage> =
                    messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
                template.render(&messages, true).map_err(ApiError::Messages)
            }
        }
    }
}

/// Relays one request's updates: its pieces, then a closing chunk with the summary (or the
/// error) go into `chunks`.
fn spawn_generation(
    mut updates: mpsc::UnboundedReceiver<Update>,
    model_version: String,
    chunks: mpsc::UnboundedSender<Result<GenerateChunk, Status>>,
) {
    tokio::spawn(async move {
        while let Some(update) = updates.recv().await {
            // A send fails only when the client has gone, which cancelled the generation.
            match update {
                Update::Piece(text) => {
                    let _ = chunks.send(Ok(GenerateChunk { text, ..Default::default() }));
                }
                Update::Done(outcome) => {
                    let last = outcome.map_err(ApiError::Internal).and_then(|g| closing_chunk(Ok(g), model_version));
                    let _ = chunks.send(last.map_err(Status::from));
                    return;
                }
            }
        }
    });
}

fn closing_chunk(outcome: Outcome, model_version: String) -> Result<GenerateChunk, ApiError> {
    let g = outcome?;
    Ok(GenerateChunk {
        text: String::new(),
        last: true,
        finish_reason: g.finish.as_str().to_owned(),
        prompt_tokens: g.prompt_tokens as u32,
        completion_tokens: g.token_ids.len() as u32,
        model_version,
    })
}

/// Stops the generation when the response stream is dropped: the client went away.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The side model a call may use, after checking its name and texts.
fn side_model<T>(
    loaded: Option<&Arc<Loaded<T>>>,
    what: &'static str,
    model: &str,
    texts: &[String],
) -> Result<Arc<Loaded<T>>, ApiError> {
    let loaded = loaded.ok_or(ApiError::Disabled(what))?;
    check_model(model, &loaded.name)?;
    match texts.len() {
        0 => Err(ApiError::NoTexts),
        n if n > MAX_TEXTS => Err(ApiError::TooManyTexts(n)),
        _ => Ok(loaded.clone()),
    }
}

fn as_strs(texts: &[String]) -> Vec<&str> {
    texts.iter().map(String::as_str).collect()
}

/// Runs model work on a blocking thread; a panic there becomes an `internal` error.
async fn blocking<R: Send + 'static>(
    job: impl FnOnce() -> Result<R, EngineError> + Send + 'static,
) -> Result<R, ApiError> {
    match tokio::task::spawn_blocking(job).await {
        Ok(result) => Ok(result?),
        Err(e) => Err(ApiError::Internal(e.to_string())),
    }
}
