//! The two bus stages. Input: `CLEAN` → `ADMITTED` (allowed or flagged, with the verdicts) or a
//! `BLOCKED_INPUT` result on `RESULTS`. Output: `COMPLETIONS` → a `COMPLETED` or
//! `BLOCKED_OUTPUT` result on `RESULTS`, carrying the input's and the output's verdicts. Each
//! message's one outbound is deduplicated on `<request_id>/<stage>` and PubAcked before the
//! message is acked; a classifier failure naks it for a retry.
use std::time::Duration;

use millrace_bus::{ConsumerSpec, Delivery, Edge, Handler, Outbound, Publisher, StageError, terminal_result};
use millrace_proto::v1::{AdmittedQuery, CleanedQuery, Completion, Result as TerminalResult, TerminalStatus};

use crate::moderator::{ModerationError, Moderator};
use crate::policy::{Action, Decision, Stage};

/// The input stage's name in timings, results and dedup ids.
pub const STAGE_INPUT: &str = ConsumerSpec::MODERATION_INPUT.durable;
/// The output stage's name in timings, results and dedup ids.
pub const STAGE_OUTPUT: &str = ConsumerSpec::MODERATION_OUTPUT.durable;

/// How long a message waits before redelivery after the classifier failed on it.
const RETRY: Duration = Duration::from_secs(1);

fn retry(e: ModerationError) -> StageError {
    StageError::transient(e.to_string(), RETRY)
}

pub struct InputStage {
    pub moderator: Moderator,
    pub publisher: Publisher,
}

impl Handler for InputStage {
    async fn handle(&self, delivery: &Delivery) -> Result<(), StageError> {
        let query: CleanedQuery = delivery.decode()?;
        millrace_bus::require_request(query.ctx.as_ref())?;
        let (decision, policy) = self.moderator.check(query.text.clone(), Stage::Input).await.map_err(retry)?;
        self.publisher.publish(input_outbound(query, &decision, policy.refusal(), delivery.received_unix_us)).await?;
        Ok(())
    }
}

pub struct OutputStage {
    pub moderator: Moderator,
    pub publisher: Publisher,
}

impl Handler for OutputStage {
    async fn handle(&self, delivery: &Delivery) -> Result<(), StageError> {
        let completion: Completion = delivery.decode()?;
        millrace_bus::require_request(completion.ctx.as_ref())?;
        let (decision, policy) = self.moderator.check(completion.text.clone(), Stage::Output).await.map_err(retry)?;
        self.publisher
            .publish(output_outbound(completion, &decision, policy.refusal(), delivery.received_unix_us))
            .await?;
        Ok(())
    }
}

/// Why a text was blocked, for the result's `reason` (the category) and `detail`.
fn blocked_because(decision: &Decision, stage: Stage) -> (String, String) {
    let verdict = decision.blocking().expect("a blocked decision has a blocking verdict");
    let detail = format!(
        "{} blocked by the moderation policy {}: category {}, rule {}, score {:.3}",
        stage.as_str(),
        decision.policy_version,
        verdict.category,
        verdict.rule,
        verdict.score
    );
    (verdict.category.clone(), detail)
}

/// The one message a cleaned query becomes: an `AdmittedQuery` on `ADMITTED`, or a
/// `BLOCKED_INPUT` result (the refusal as its completion) on `RESULTS`.
pub fn input_outbound(mut query: CleanedQuery, decision: &Decision, refusal: &str, received_unix_us: i64) -> Outbound {
    query.timings.get_or_insert_default().record(STAGE_INPUT, received_unix_us);
    if decision.action == Action::Block {
        let (reason, detail) = blocked_because(decision, Stage::Input);
        return Outbound::terminal(&TerminalResult {
            prompt: query.text,
            completion: refusal.to_owned(),
            verdicts: decision.verdicts.clone(),
            prompt_tokens: query.token_count,
            ..terminal_result(STAGE_INPUT, query.ctx, query.timings, TerminalStatus::BlockedInput, reason, detail)
        });
    }
    let admitted = AdmittedQuery {
        ctx: query.ctx,
        timings: query.timings,
        text: query.text,
        token_count: query.token_count,
        verdicts: decision.verdicts.clone(),
        messages: query.messages,
    };
    Outbound::stage_output(Edge::ADMITTED, STAGE_INPUT, &admitted)
}

/// The terminal result a completion becomes: `COMPLETED` with its text, or `BLOCKED_OUTPUT`
/// with the refusal in its place; either way with the input's and the output's verdicts.
pub fn output_outbound(mut c: Completion, decision: &Decision, refusal: &str, received_unix_us: i64) -> Outbound {
    c.timings.get_or_insert_default().record(STAGE_OUTPUT, received_unix_us);
    let mut verdicts = c.verdicts;
    verdicts.extend(decision.verdicts.iter().cloned());
    let (status, reason, detail, completion) = if decision.action == Action::Block {
        let (reason, detail) = blocked_because(decision, Stage::Output);
        (TerminalStatus::BlockedOutput, reason, detail, refusal.to_owned())
    } else {
        (TerminalStatus::Completed, c.finish_reason, String::new(), c.text)
    };
    Outbound::terminal(&TerminalResult {
        // The user's (redacted) turn; the rendered prompt only when the turn is unknown.
        prompt: if c.user_text.is_empty() { c.prompt } else { c.user_text },
        completion,
        verdicts,
        model_version: c.model_version,
        prompt_tokens: c.prompt_tokens,
        completion_tokens: c.completion_tokens,
        turns_dropped: c.turns_dropped,
        prompt_tokens_cached: c.prompt_tokens_cached,
        // What the completion's tokens were: a refusal in its place has none.
        logprobs: if status == TerminalStatus::Completed { c.logprobs } else { Vec::new() },
        ..terminal_result(STAGE_OUTPUT, c.ctx, c.timings, status, reason, detail)
    })
}

#[cfg(test)]
mod tests {
    use millrace_proto::Message as _;
    use millrace_proto::v1::{RequestContext, StageTiming, Timings, Verdict};

    use super::*;
    use crate::normalize::normalize;
    use crate::policy::Policy;

    fn ctx() -> Option<RequestContext> {
        Some(RequestContext { request_id: "r1".into(), user: "u".into(), ..Default::default() })
    }

    fn timings() -> Option<Timings> {
        Some(Timings {
            stages: vec![StageTiming { stage: "preprocess".into(), received_unix_us: 1, finished_unix_us: 2 }],
        })
    }

    fn decide(text: &str, stage: Stage) -> Decision {
        Policy::default_policy().evaluate(&normalize(text), stage, None)
    }

    fn query(text: &str) -> CleanedQuery {
        CleanedQuery { ctx: ctx(), timings: timings(), text: text.into(), token_count: 7, ..Default::default() }
    }

    fn completion(text: &str) -> Completion {
        Completion {
            ctx: ctx(),
            timings: timings(),
            prompt: "<|im_start|>user\nhi<|im_end|>".into(),
            user_text: "hi".into(),
            text: text.into(),
            prompt_tokens: 9,
            completion_tokens: 4,
            model_version: "v1".into(),
            finish_reason: "eos".into(),
            verdicts: vec![Verdict { stage: "input".into(), action: "allow".into(), ..Default::default() }],
            turns_dropped: 2,
            logprobs: vec![],
            prompt_tokens_cached: 6,
        }
    }

    fn stages(t: Option<Timings>) -> Vec<String> {
        t.unwrap().stages.into_iter().map(|s| s.stage).collect()
    }

    #[test]
    fn an_allowed_or_flagged_query_is_admitted_with_its_verdicts() {
        let text = "this damn printer is broken again";
        let out = input_outbound(query(text), &decide(text, Stage::Input), "no", 100);
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.admitted", "r1/moderation-input"));
        let a = AdmittedQuery::decode(out.payload.as_ref()).unwrap();
        assert_eq!((a.text.as_str(), a.token_count, a.ctx), (text, 7, ctx()));
        assert_eq!(a.verdicts.len(), 1);
        assert_eq!((a.verdicts[0].category.as_str(), a.verdicts[0].action.as_str()), ("profanity", "flag"));
        assert_eq!((a.verdicts[0].stage.as_str(), a.verdicts[0].rule.as_str()), ("input", "keyword:damn"));
        assert_eq!(stages(a.timings), ["preprocess", "moderation-input"]);
    }

    #[test]
    fn a_blocked_query_ends_as_a_blocked_input_result() {
        let text = "k.y.s loser";
        let out = input_outbound(query(text), &decide(text, Stage::Input), "Sorry.", 100);
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.results.r1", "r1/outcome"));
        let r = TerminalResult::decode(out.payload.as_ref()).unwrap();
        assert_eq!(
            (r.status(), r.reason.as_str(), r.stage.as_str()),
            (TerminalStatus::BlockedInput, "threats", "moderation-input")
        );
        assert_eq!((r.prompt.as_str(), r.completion.as_str(), r.prompt_tokens), (text, "Sorry.", 7));
        assert!(r.detail.contains("keyword:kys"), "{}", r.detail);
        assert_eq!(stages(r.timings), ["preprocess", "moderation-input"]);
    }

    #[test]
    fn completions_end_completed_or_blocked_with_both_stages_verdicts() {
        let text = "Paris is the capital of France.";
        let out = output_outbound(completion(text), &decide(text, Stage::Output), "Sorry.", 100);
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.results.r1", "r1/outcome"));
        let r = TerminalResult::decode(out.payload.as_ref()).unwrap();
        assert_eq!((r.status(), r.reason.as_str()), (TerminalStatus::Completed, "eos"));
        assert_eq!((r.prompt.as_str(), r.completion.as_str(), r.model_version.as_str()), ("hi", text, "v1"));
        assert_eq!((r.prompt_tokens, r.completion_tokens, r.turns_dropped, r.prompt_tokens_cached), (9, 4, 2, 6));
        let v: Vec<_> = r.verdicts.iter().map(|v| (v.stage.as_str(), v.action.as_str())).collect();
        assert_eq!(v, [("input", "allow"), ("output", "allow")]);
        assert_eq!(stages(r.timings), ["preprocess", "moderation-output"]);

        let text = "You are a worthless idiot.";
        let r = TerminalResult::decode(
            output_outbound(completion(text), &decide(text, Stage::Output), "Sorry.", 100).payload.as_ref(),
        )
        .unwrap();
        assert_eq!(
            (r.status(), r.reason.as_str(), r.completion.as_str()),
            (TerminalStatus::BlockedOutput, "abuse", "Sorry.")
        );
        assert_eq!(r.verdicts.last().unwrap().category, "abuse");
        assert_eq!(r.stage, "moderation-output");
        assert_eq!((r.prompt_tokens, r.turns_dropped, r.prompt_tokens_cached), (9, 2, 6), "a refusal keeps the usage");
    }

    #[test]
    fn a_blocked_word_hidden_behind_bidi_controls_is_blocked_on_output() {
        // Model output reaches moderation without passing preprocess, which strips these.
        for text in [
            "You are a wor\u{202E}thless id\u{2066}iot\u{2069}.",
            "You are a \u{202A}worthless\u{202C} \u{061C}idiot\u{FFF9}.",
        ] {
            let r = TerminalResult::decode(
                output_outbound(completion(text), &decide(text, Stage::Output), "Sorry.", 100).payload.as_ref(),
            )
            .unwrap();
            assert_eq!((r.status(), r.reason.as_str()), (TerminalStatus::BlockedOutput, "abuse"), "{text:?}");
        }
    }
}
