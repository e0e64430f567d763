//! Following one request to its end, for every API that answers with the outcome (OpenAI
//! chat, WebSocket, gRPC `Generate`).
//!
//! Two core-NATS subscriptions, opened before the query is published so nothing is missed:
//! the raw tokens inference streams (`mr.v1.tokens.<id>`), released through a [`StreamGuard`],
//! and the request's terminal result (`mr.v1.results.<id>`: the `RESULTS` stream keeps its copy
//! for the sink; a core subscriber sees the same publish at once). The decided outcome is also
//! looked up now and then — in the ledger (`MR_OUTCOMES`, decided before it is published, and
//! readable while the sink is down), then in the sink for one older than the ledger keeps: a
//! request whose result was published before the subscriptions existed (an idempotent retry of
//! a finished request) or a lost core message still ends.
//!
//! The events: released text in order, then, once the terminal result is in, whatever of its
//! completion was not released yet, then the result itself. So for a completed request the
//! streamed text always equals the stored completion.
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use millrace_bus::topology::ephemeral;
use millrace_bus::{BusError, Edge, Ledger};
use millrace_proto::row::ResultRow;
use millrace_proto::v1::inference_client::InferenceClient;
use millrace_proto::v1::moderation_client::ModerationClient;
use millrace_proto::v1::{RequestContext, Result as TerminalResult, TerminalStatus, TokenChunk};
use millrace_proto::{Message, now_unix_ms};
use tonic::transport::Channel;
use tracing::warn;

use crate::auth::ApiKeys;
use crate::error::ApiError;
use crate::gateway::{Accepted, CancelOnDrop, Gateway};
use crate::guard::StreamGuard;
use crate::metrics;
use crate::results::ResultsClient;
use crate::submit::Submission;

/// How long after the request's deadline its terminal result is still waited for (the stage
/// that expires the request needs a moment to report it).
const DEADLINE_GRACE: Duration = Duration::from_secs(5);
/// How often the outcome is looked up, as a safety net behind the result subscription.
const OUTCOME_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Moderated text, in order.
    Text(String),
    /// The terminal outcome; the last event.
    Finished(Box<ResultRow>),
}

/// What the APIs share: submitting, the sink, the services they ask directly.
#[derive(Clone)]
pub struct Frontend {
    pub gateway: Gateway,
    pub results: ResultsClient,
    /// `Moderation.Check`, which releases streamed text (and answers `/v1/moderations`);
    /// `None` streams nothing before the end.
    pub moderation: Option<ModerationClient<Channel>>,
    /// `Inference.Embed` for `/v1/embeddings`; `None` answers it 503.
    pub inference: Option<InferenceClient<Channel>>,
    /// The API keys every API checks (none configured: keys are off).
    pub keys: Arc<ApiKeys>,
}

impl Frontend {
    /// Validates and publishes the submit with a follower subscribed first.
    pub async fn submit_and_follow(
        &self,
        submission: Submission,
        received_unix_us: i64,
    ) -> Result<(Accepted, Follower), ApiError> {
        let query = self.gateway.prepare(submission, received_unix_us)?;
        let ctx = query.ctx.as_ref().expect("prepare sets the context");
        // Ingest always sets a deadline; one without would be followed for the grace alone.
        let until_deadline = ctx.time_left(now_unix_ms()).unwrap_or_default();
        let follower = Follower::start(self, ctx.clone(), Instant::now() + until_deadline + DEADLINE_GRACE).await?;
        let accepted = self.gateway.publish(query).await?;
        Ok((accepted, follower))
    }
}

/// One request's events; dropped before the end, it cancels the request.
pub struct Follower {
    ctx: RequestContext,
    cancel: CancelOnDrop,
    tokens: async_nats::Subscriber,
    results: async_nats::Subscriber,
    ledger: Ledger,
    sink: ResultsClient,
    guard: StreamGuard,
    wait_until: Instant,
    /// Raw token index expected next (redeliveries and duplicates are skipped).
    next_index: u32,
    saw_last_token: bool,
    /// The terminal result, once in.
    finished: Option<ResultRow>,
    ready: VecDeque<Event>,
    done: bool,
    next_outcome_poll: Instant,
    /// When following began (just before the query is published), for the client's latencies.
    started: Instant,
    /// Whether the first text was timed (TTFT).
    first_text_timed: bool,
}

impl Follower {
    /// Subscribes; publish the query only after this returns.
    async fn start(frontend: &Frontend, ctx: RequestContext, wait_until: Instant) -> Result<Self, ApiError> {
        let nats = frontend.gateway.nats();
        let request_id = ctx.request_id.as_str();
        let unavailable =
            |e: async_nats::SubscribeError| ApiError::Unavailable(BusError::unavailable("subscription", e));
        let tokens = nats.subscribe(ephemeral::tokens(request_id)).await.map_err(unavailable)?;
        let results = nats.subscribe(Edge::RESULTS.subject_for(request_id)).await.map_err(unavailable)?;
        Ok(Self {
            cancel: CancelOnDrop::new(frontend.gateway.clone(), ctx.clone()),
            ctx,
            tokens,
            results,
            ledger: frontend.gateway.ledger().clone(),
            sink: frontend.results.clone(),
            guard: StreamGuard::new(frontend.moderation.clone()),
            wait_until,
            next_index: 0,
            saw_last_token: false,
            finished: None,
            ready: VecDeque::new(),
            done: false,
            next_outcome_poll: Instant::now() + OUTCOME_POLL,
            started: Instant::now(),
            first_text_timed: false,
        })
    }

    pub fn request_id(&self) -> &str {
        &self.ctx.request_id
    }

    /// The request's context, as published.
    pub fn context(&self) -> &RequestContext {
        &self.ctx
    }

    /// The next event; `None` after [`Event::Finished`] or the deadline error.
    pub async fn next(&mut self) -> Option<Result<Event, ApiError>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                self.time(&event);
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            if let Some(row) = self.finished.take() {
                self.finish(row);
                continue;
            }
            if Instant::now() >= self.wait_until {
                self.done = true;
                return Some(Err(ApiError::DeadlinePassed(self.ctx.request_id.clone())));
            }
            let deadline = tokio::time::Instant::from_std(self.wait_until);
            let outcome_poll = tokio::time::Instant::from_std(self.next_outcome_poll);
            let checking = self.guard.checking();
            tokio::select! {
                message = self.tokens.next(), if !self.saw_last_token => match message {
                    Some(message) => self.on_token(&message.payload),
                    None => self.saw_last_token = true,
                },
                released = self.guard.checked(&self.ctx.request_id), if checking => {
                    if let Some(text) = released {
                        self.ready.push_back(Event::Text(text));
                    }
                }
                message = self.results.next(), if self.finished.is_none() => {
                    if let Some(message) = message {
                        self.on_result(&message.payload);
                    }
                }
                _ = tokio::time::sleep_until(outcome_poll), if self.finished.is_none() => self.poll_outcome().await,
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Times what the client is handed: its first text, and the terminal result.
    fn time(&mut self, event: &Event) {
        let elapsed = self.started.elapsed().as_secs_f64();
        match event {
            Event::Text(text) if !self.first_text_timed && !text.is_empty() => {
                self.first_text_timed = true;
                metrics::TTFT.with_label_values(&[&self.ctx.model]).observe(elapsed);
            }
            Event::Finished(row) => {
                metrics::E2E.with_label_values(&[&self.ctx.model, row.status.name()]).observe(elapsed);
            }
            Event::Text(_) => {}
        }
    }

    fn on_token(&mut self, payload: &[u8]) {
        let chunk = match TokenChunk::decode(payload) {
            Ok(chunk) => chunk,
            Err(e) => return warn!(request_id = self.ctx.request_id, error = %e, "undecodable token chunk"),
        };
        self.saw_last_token |= chunk.last;
        if chunk.index < self.next_index {
            return;
        }
        self.next_index = chunk.index + 1;
        // After the result, the rest comes from its completion: no more checks.
        if self.finished.is_none() {
            self.guard.push(&chunk.text);
        }
    }

    fn on_result(&mut self, payload: &[u8]) {
        let row = TerminalResult::decode(payload)
            .map_err(|e| e.to_string())
            .and_then(|result| ResultRow::from_result(result, 0).map_err(|e| e.to_string()));
        match row {
            Ok(row) => self.on_finished(row),
            Err(e) => warn!(request_id = self.ctx.request_id, error = %e, "unreadable terminal result"),
        }
    }

    /// The terminal result is in: a check under way no longer matters, the result's
    /// completion (moderated by the mesh) supplies the rest.
    fn on_finished(&mut self, row: ResultRow) {
        self.guard.stop();
        self.finished = Some(row);
    }

    async fn poll_outcome(&mut self) {
        self.next_outcome_poll = Instant::now() + OUTCOME_POLL;
        match self.ledger.outcome(&self.ctx.request_id).await {
            Ok(Some(payload)) => return self.on_result(&payload),
            Ok(None) => {}
            Err(e) => warn!(request_id = self.ctx.request_id, error = %e, "outcome not read; asking the sink"),
        }
        match self.sink.get(&self.ctx.request_id).await {
            Ok(Some(bytes)) => match serde_json::from_slice::<ResultRow>(&bytes) {
                Ok(row) => self.on_finished(row),
                Err(e) => warn!(request_id = self.ctx.request_id, error = %e, "bad sink row"),
            },
            Ok(None) => {}
            Err(e) => warn!(request_id = self.ctx.request_id, error = %e, "sink row not read; retrying"),
        }
    }

    /// Queues what the result adds to the released text, then the result: the rest of a
    /// completion, or the refusal of a blocked request that had nothing released.
    fn finish(&mut self, row: ResultRow) {
        self.done = true;
        self.cancel.finished();
        let released = self.guard.released();
        let blocked = [TerminalStatus::BlockedInput, TerminalStatus::BlockedOutput];
        let rest = if row.status == TerminalStatus::Completed {
            // `None` cannot happen while moderation leaves completions as generated; if it
            // ever does, the stream stays short rather than contradicting itself.
            row.completion.strip_prefix(released).or_else(|| {
                warn!(request_id = self.ctx.request_id, "the completion does not extend the streamed text");
                None
            })
        } else if blocked.contains(&row.status) && released.is_empty() {
            Some(row.completion.as_str())
        } else {
            None
        };
        if let Some(rest) = rest.filter(|rest| !rest.is_empty()) {
            self.ready.push_back(Event::Text(rest.to_owned()));
        }
        self.ready.push_back(Event::Finished(Box::new(row)));
    }
}
