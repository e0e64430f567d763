//! The stage BATCHES → COMPLETIONS: every member of a batch is submitted to a generation loop
//! ([`crate::generation`]), where it joins the running set at the next decode step; its token
//! pieces go out on its core-NATS token subject as they are made, and as soon as it ends its one
//! outcome — its `Completion`, or the terminal `Result` of a request cancelled, expired or
//! rejected — is published with a PubAck. The batch is acked once every member's outcome is
//! (ack after effect). A member the engine fails on fails the batch, which is retried: the
//! outputs' dedup ids (`<request_id>/inference`) make a retry that got further harmless.
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use millrace_bus::topology::ephemeral;
use millrace_bus::{ConsumerSpec, Delivery, Edge, Handler, Outbound, Publisher, StageError, terminal_result};
use millrace_engine::{FinishReason, Generation};
use millrace_proto::v1::{
    Batch, Completion, Prompt, RequestContext, Result as TerminalResult, TerminalStatus, TokenChunk, TokenLogprob,
    TopLogprob,
};
use millrace_proto::{Message as _, now_unix_ms};
use tracing::{debug, warn};

use crate::cancel::CancelRegistry;
use crate::generation::Update;
use crate::metrics;
use crate::pool::{Engines, Outcome};
use crate::request::{Defaults, check_model, generation_request, seed_from_request_id};

/// This stage's name in timings, terminal results and dedup ids.
pub const STAGE: &str = ConsumerSpec::INFERENCE.durable;

/// How long a batch waits before being redelivered after the engine failed on it.
const ENGINE_RETRY: Duration = Duration::from_secs(1);

pub struct BatchStage {
    pub engines: Arc<Engines>,
    pub cancels: Arc<CancelRegistry>,
    pub publisher: Publisher,
    pub defaults: Defaults,
}

impl Handler for BatchStage {
    async fn handle(&self, delivery: &Delivery) -> Result<(), StageError> {
        let batch: Batch = delivery.decode()?;
        let (prompts, anonymous): (Vec<Prompt>, Vec<Prompt>) =
            batch.prompts.into_iter().partition(|p| p.ctx.as_ref().is_some_and(|c| !c.request_id.is_empty()));
        if !anonymous.is_empty() {
            warn!(
                batch_id = batch.batch_id,
                dropped = anonymous.len(),
                "prompts without a request id: no result can name them"
            );
        }
        let model = &batch.model;
        let members = prompts.into_iter().map(|prompt| self.serve(model, prompt, delivery.received_unix_us));
        futures::future::join_all(members).await.into_iter().collect()
    }
}

impl BatchStage {
    /// Generates one member (unless it is rejected, or done already) and publishes its outcome.
    async fn serve(&self, model: &str, prompt: Prompt, received_unix_us: i64) -> Result<(), StageError> {
        let request_id = context(&prompt).request_id.clone();
        if let Some(reason) = self.done_before(&request_id).await? {
            debug!(request_id, reason, "not generated again");
            metrics::SKIPPED.with_label_values(&[reason]).inc();
            return Ok(());
        }
        let outcome = match check_model(model, &self.engines.model) {
            Ok(()) => self.generate(&prompt).await?,
            Err(rejection) => Err(rejection),
        };
        let out = outbound(prompt, outcome, &self.engines.model_version, received_unix_us);
        let is_completion = out.subject == Edge::COMPLETIONS.subject;
        self.publisher.publish(out).await?;
        if is_completion {
            self.publisher.ledger().record_completion(&request_id).await?;
        }
        Ok(())
    }

    /// Why a member needs no generation: its completion is already published (a batch
    /// redelivered after its first owner died or stalled past the ack wait) or its request has
    /// already ended (cancelled, expired, or a copy run again after a broker restart).
    /// A decided outcome is published again (`Publisher::republish_outcome`): its decider may
    /// have lost its publish.
    async fn done_before(&self, request_id: &str) -> Result<Option<&'static str>, StageError> {
        Ok(if self.publisher.ledger().completion_published(request_id).await? {
            Some("completion_published")
        } else if self.publisher.republish_outcome(request_id).await? {
            Some("outcome_decided")
        } else {
            None
        })
    }

    /// Runs the prompt in a generation loop, streaming its pieces; cancellable from the moment
    /// its batch arrived (waiting for admission included).
    async fn generate(&self, prompt: &Prompt) -> Result<Outcome, StageError> {
        let ctx = context(prompt);
        let registration = self.cancels.register(&ctx.request_id);
        let deadline = ctx.deadline_instant(Instant::now(), now_unix_ms());
        let request = generation_request(
            prompt.prompt.clone(),
            ctx.params.as_ref(),
            self.defaults,
            seed_from_request_id(&ctx.request_id),
            deadline,
            registration.flag(),
        );
        if let Err(rejection) = self.engines.check_fit(&request.prompt, request.max_new_tokens) {
            return Ok(Err(rejection));
        }
        let mut updates = self.engines.generation.submit(request);
        let client = self.publisher.client();
        let mut sent = 0u32;
        let mut arrived = Vec::new();
        // Pieces that queued up while the last chunk went out travel together: no piece waits
        // for company, yet a fast engine does not cost a message per token.
        while updates.recv_many(&mut arrived, usize::MAX).await > 0 {
            let (mut text, mut done) = (String::new(), None);
            for update in arrived.drain(..) {
                match update {
                    Update::Piece(piece) => text.push_str(&piece),
                    Update::Done(outcome) => done = Some(outcome),
                }
            }
            if !text.is_empty() {
                publish_chunk(&client, &ctx.request_id, sent, text, false).await;
                sent += 1;
            }
            match done {
                None => {}
                Some(Ok(generation)) => {
                    // Closed only once generation succeeded: a failed batch is retried and streams again.
                    publish_chunk(&client, &ctx.request_id, sent, String::new(), true).await;
                    return Ok(Ok(generation));
                }
                Some(Err(e)) => return Err(StageError::transient(format!("engine: {e}"), ENGINE_RETRY)),
            }
        }
        Err(StageError::transient("the generation loop stopped", ENGINE_RETRY))
    }
}

/// The context of a prompt kept for generation (those without one were set aside).
fn context(prompt: &Prompt) -> &RequestContext {
    prompt.ctx.as_ref().expect("prompts without a context are set aside")
}

async fn publish_chunk(client: &Client, request_id: &str, index: u32, text: String, last: bool) {
    let chunk = TokenChunk { request_id: request_id.to_owned(), index, text, last };
    // Core NATS, best effort by design: the Completion carries the whole text durably.
    if let Err(e) = client.publish(ephemeral::tokens(request_id), chunk.encode_to_vec().into()).await {
        debug!(request_id, error = %e, "token chunk not sent");
    }
}

/// The one message a batch member becomes: its `Completion`, or the terminal `Result` of a
/// request that ended without one.
pub fn outbound(mut prompt: Prompt, outcome: Outcome, model_version: &str, received_unix_us: i64) -> Outbound {
    prompt.timings.get_or_insert_default().record(STAGE, received_unix_us);
    let result = match outcome {
        Ok(g) => match g.finish {
            FinishReason::Eos | FinishReason::Length | FinishReason::Stop => {
                return Outbound::stage_output(Edge::COMPLETIONS, STAGE, &completion(prompt, g, model_version));
            }
            FinishReason::Cancelled => {
                let detail = format!("cancelled after {} generated tokens", g.token_ids.len());
                terminal(prompt, TerminalStatus::Cancelled, "cancelled", detail, Some(g), model_version)
            }
            FinishReason::Deadline => {
                let detail = format!("deadline passed after {} generated tokens", g.token_ids.len());
                terminal(prompt, TerminalStatus::Expired, "deadline_exceeded", detail, Some(g), model_version)
            }
            FinishReason::Refused => {
                let detail = g.refusal.clone().unwrap_or_default();
                terminal(prompt, TerminalStatus::Rejected, "invalid_response_format", detail, None, model_version)
            }
        },
        Err(rejection) => {
            terminal(prompt, TerminalStatus::Rejected, rejection.code(), rejection.to_string(), None, model_version)
        }
    };
    Outbound::terminal(&result)
}

fn completion(prompt: Prompt, g: Generation, model_version: &str) -> Completion {
    Completion {
        ctx: prompt.ctx,
        timings: prompt.timings,
        prompt: prompt.prompt,
        completion_tokens: g.token_ids.len() as u32,
        prompt_tokens: g.prompt_tokens as u32,
        text: g.text,
        model_version: model_version.to_owned(),
        finish_reason: g.finish.as_str().to_owned(),
        user_text: prompt.user_text,
        verdicts: prompt.verdicts,
        turns_dropped: prompt.turns_dropped,
        logprobs: logprobs(g.logprobs),
        prompt_tokens_cached: g.cached_tokens as u32,
    }
}

/// The engine's per-token log probabilities, as the contract carries them.
fn logprobs(engine: Vec<millrace_engine::TokenLogprob>) -> Vec<TokenLogprob> {
    engine
        .into_iter()
        .map(|t| TokenLogprob {
            token: t.token,
            logprob: t.logprob,
            top: t.top.into_iter().map(|(token, logprob)| TopLogprob { token, logprob }).collect(),
        })
        .collect()
}

/// A terminal result carrying what was generated before the request ended, if anything.
fn terminal(
    prompt: Prompt,
    status: TerminalStatus,
    reason: &str,
    detail: String,
    partial: Option<Generation>,
    model_version: &str,
) -> TerminalResult {
    let (completion, prompt_tokens, completion_tokens, logprobs, prompt_tokens_cached) = match partial {
        Some(g) => (
            g.text,
            g.prompt_tokens as u32,
            g.token_ids.len() as u32,
            self::logprobs(g.logprobs),
            g.cached_tokens as u32,
        ),
        None => (String::new(), prompt.prompt_tokens, 0, Vec::new(), 0),
    };
    TerminalResult {
        prompt: prompt.prompt,
        completion,
        verdicts: prompt.verdicts,
        model_version: model_version.to_owned(),
        prompt_tokens,
        completion_tokens,
        turns_dropped: prompt.turns_dropped,
        logprobs,
        prompt_tokens_cached,
        ..terminal_result(STAGE, prompt.ctx, prompt.timings, status, reason, detail)
    }
}

#[cfg(test)]
mod tests {
    use millrace_proto::v1::{GenerationParams, StageTiming, Timings, Verdict};

    use super::*;
    use crate::request::Rejection;

    fn prompt() -> Prompt {
        Prompt {
            ctx: Some(RequestContext {
                request_id: "r1".into(),
                params: Some(GenerationParams { max_new_tokens: 8, ..Default::default() }),
                ..Default::default()
            }),
            timings: Some(Timings {
                stages: vec![StageTiming { stage: "batcher".into(), received_unix_us: 1, finished_unix_us: 2 }],
            }),
            prompt: "<|im_start|>user\nHi<|im_end|>\n".into(),
            prompt_tokens: 9,
            user_text: "Hi".into(),
            verdicts: vec![Verdict { stage: "input".into(), action: "allow".into(), ..Default::default() }],
            ..Default::default()
        }
    }

    fn generation(finish: FinishReason) -> Generation {
        Generation {
            text: "Hello".into(),
            token_ids: vec![5, 6],
            prompt_tokens: 7,
            cached_tokens: 3,
            finish,
            refusal: None,
            logprobs: vec![],
        }
    }

    fn result_of(out: &Outbound) -> TerminalResult {
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.results.r1", "r1/outcome"));
        TerminalResult::decode(out.payload.as_ref()).unwrap()
    }

    #[test]
    fn a_finished_generation_becomes_a_completion_carrying_the_request_over() {
        let out = outbound(prompt(), Ok(generation(FinishReason::Eos)), "v9", 100);
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.completions", "r1/inference"));
        let c = Completion::decode(out.payload.as_ref()).unwrap();
        assert_eq!((c.text.as_str(), c.prompt_tokens, c.completion_tokens), ("Hello", 7, 2));
        assert_eq!(c.prompt_tokens_cached, 3, "what the prefix cache saved travels with the completion");
        assert_eq!((c.model_version.as_str(), c.finish_reason.as_str()), ("v9", "eos"));
        assert_eq!((c.user_text.as_str(), c.verdicts.len()), ("Hi", 1));
        assert_eq!(c.prompt, prompt().prompt);
        assert_eq!(c.ctx, prompt().ctx);
        let stages = c.timings.unwrap().stages;
        assert_eq!(stages.iter().map(|s| s.stage.as_str()).collect::<Vec<_>>(), ["batcher", "inference"]);
        assert_eq!(stages[1].received_unix_us, 100);
        assert!(stages[1].finished_unix_us >= 100);
        let c = Completion::decode(outbound(prompt(), Ok(generation(FinishReason::Stop)), "v9", 100).payload.as_ref())
            .unwrap();
        assert_eq!(c.finish_reason, "stop");
    }

    #[test]
    fn cancelled_and_expired_requests_get_a_terminal_result_instead() {
        let r = result_of(&outbound(prompt(), Ok(generation(FinishReason::Cancelled)), "v9", 100));
        assert_eq!(
            (r.status(), r.reason.as_str(), r.stage.as_str()),
            (TerminalStatus::Cancelled, "cancelled", "inference")
        );
        assert_eq!((r.completion.as_str(), r.completion_tokens, r.model_version.as_str()), ("Hello", 2, "v9"));
        assert_eq!(r.timings.unwrap().stages.last().unwrap().stage, "inference");
        let r = result_of(&outbound(prompt(), Ok(generation(FinishReason::Deadline)), "v9", 100));
        assert_eq!((r.status(), r.reason.as_str()), (TerminalStatus::Expired, "deadline_exceeded"));
    }

    #[test]
    fn a_rejected_request_gets_a_rejected_result_with_its_code() {
        let rejection = Rejection::PromptTooLong { tokens: 9000, context: 8192 };
        let r = result_of(&outbound(prompt(), Err(rejection), "v9", 100));
        assert_eq!((r.status(), r.reason.as_str()), (TerminalStatus::Rejected, "prompt_too_long"));
        assert_eq!((r.prompt_tokens, r.completion_tokens, r.completion.as_str()), (9, 0, ""));
        assert!(r.detail.contains("9000"), "{}", r.detail);
    }
}
