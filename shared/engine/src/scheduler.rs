//! Iteration-level ("continuous") batching over one [`Generator`]: a running set of sequences
//! decodes one token per step, and at every step finished sequences leave and waiting ones
//! join, so a request's first token never waits for another request's last.
//!
//! One step:
//! 1. waiting or running sequences that were cancelled or ran past their deadline end now
//!    (a waiting one with no tokens);
//! 2. waiting sequences are admitted, oldest first, while the running set has room: at most
//!    `max_running` sequences, and the KV they may grow to fits the budget (below);
//! 3. admitted prompts are prefilled, each on its own (batch 1) from the longest prefix found
//!    in the [`PrefixCache`], in chunks: at most `prefill_chunk_tokens` prompt tokens per step in
//!    all, so a long prompt does not stall everyone's next token; a prompt whose prefill
//!    completes samples its first token and joins the running set;
//! 4. the running set decodes one token per sequence in one forward pass.
//!
//! The running set's KV is one tensor per layer and kind, `[running, heads, width, dim]`, each
//! sequence's positions right-aligned and masked on the left, as a left-padded static batch has
//! them: a sequence computes what it would alone. Sequences join and leave by rebuilding those
//! tensors on the host (one copy of the set's KV, at most once per step, only when membership
//! changes); between changes the graph's `present` outputs are fed back as they are.
//!
//! **KV budget.** A sequence may grow to `prompt + max_new_tokens` tokens (its reservation). The
//! padded tensor is at most `running × the largest reservation` tokens wide, so a sequence is
//! admitted only while `(running + 1) × max(reservations) ≤ kv_budget_tokens`; what does not fit
//! waits (and ends as `Deadline` if its deadline passes first). A request larger than the whole
//! budget is refused at submission. Nothing grows without bound: the caller bounds what it
//! submits (see the inference service's capacity reports).
//!
//! **Static policy.** [`BatchingPolicy::Static`] admits only when nothing runs, then everything
//! that fits at once, and decodes until all of it has finished — classic static batching on the
//! same code, kept as the baseline the benchmarks compare against.
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayD, ArrayViewD, Axis, IxDyn, Slice, s};
use ort::value::{DynValue, Tensor};

use crate::EngineError;
use crate::generate::{FinishReason, Generation, GenerationRequest, Generator, Row, take_generation};
use crate::prefix_cache::PrefixCache;

/// The caller's name for a submitted sequence.
pub type SequenceId = u64;

/// When waiting sequences may join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchingPolicy {
    /// At every step, as room frees.
    Continuous,
    /// Only when nothing runs (static batching; the benchmarks' baseline).
    Static,
}

impl std::str::FromStr for BatchingPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "continuous" => Ok(Self::Continuous),
            "static" => Ok(Self::Static),
            other => Err(format!("unknown batching policy {other:?} (continuous, static)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub policy: BatchingPolicy,
    /// Most sequences decoding together.
    pub max_running: usize,
    /// KV tokens the running set may reserve (see the module docs).
    pub kv_budget_tokens: usize,
    /// Prompt tokens prefilled per step, over all admitted prompts.
    pub prefill_chunk_tokens: usize,
    /// Tokens of KV the prefix cache keeps (0: no prefix reuse).
    pub prefix_cache_tokens: usize,
}

/// What a step tells the caller about a sequence.
pub enum Event<'a> {
    /// More text (pieces concatenate to the final text).
    Piece(&'a str),
    /// The sequence ended; nothing follows.
    Finished(Generation),
}

/// What one step did.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Prompt tokens computed, and reused from the prefix cache, by prefills this step.
    pub prefill_tokens: usize,
    pub cached_tokens: usize,
    /// Sequences admitted (their prefill started) and lookups that found a cached prefix.
    pub admitted: usize,
    pub prefix_hits: usize,
    /// Sequences in this step's decode pass (one token each).
    pub decoded: usize,
    pub elapsed: Duration,
}

/// The scheduler's occupancy, for capacity reports and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Sequences decoding or being prefilled.
    pub running: usize,
    /// Submitted, not yet admitted.
    pub waiting: usize,
    pub max_running: usize,
    pub kv_budget_tokens: usize,
    /// Tokens of KV the running set and the prefills hold now.
    pub kv_used_tokens: usize,
    pub prefix_cache_tokens: usize,
}

struct Sequence {
    id: SequenceId,
    request: GenerationRequest,
    prompt: Vec<u32>,
    row: Row,
    /// The tokens whose KV this sequence holds, in order (prompt, then generated ones fed back).
    fed: Vec<u32>,
    /// Most tokens of KV it may grow to.
    reserved: usize,
}

impl Sequence {
    fn finished(&self) -> bool {
        self.row.finish.is_some()
    }
}

/// A prompt being prefilled: its KV so far (`[1, heads, fed, dim]`).
struct Prefill {
    seq: Sequence,
    past: Vec<DynValue>,
}

/// The running set and its padded KV.
#[derive(Default)]
struct Running {
    seqs: Vec<Sequence>,
    /// `[seqs, heads, width, dim]` per layer and kind; empty when `seqs` is.
    kv: Vec<DynValue>,
    width: usize,
}

pub struct Scheduler {
    generator: Generator,
    config: SchedulerConfig,
    waiting: VecDeque<Sequence>,
    prefilling: VecDeque<Prefill>,
    running: Running,
    cache: PrefixCache,
}

impl Scheduler {
    pub fn new(generator: Generator, config: SchedulerConfig) -> Result<Self, EngineError> {
        let context = generator.spec().context_length;
        if config.kv_budget_tokens < context {
            return Err(EngineError::InvalidRequest(format!(
                "a KV budget of {} tokens is below the model's context of {context}: a long request could never run",
                config.kv_budget_tokens
            )));
        }
        let config = SchedulerConfig {
            max_running: config.max_running.max(1),
            prefill_chunk_tokens: config.prefill_chunk_tokens.max(1),
            ..config
        };
        let cache = PrefixCache::new(config.prefix_cache_tokens);
        Ok(Self {
            generator,
            config,
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            running: Running::default(),
            cache,
        })
    }

    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    /// The generator back, with whatever was still queued or running dropped.
    pub fn into_generator(self) -> Generator {
        self.generator
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues a request; it is admitted by a later [`Self::step`]. Refuses, alone, a request that
    /// could never run: an empty prompt, or one too long for the context or the KV budget.
    pub fn submit(&mut self, id: SequenceId, request: GenerationRequest) -> Result<(), EngineError> {
        let prompt = self.generator.encode(&request.prompt)?;
        let context = self.generator.spec().context_length;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("empty prompt".into()));
        }
        if prompt.len() + request.max_new_tokens.min(1) > context {
            return Err(EngineError::InvalidRequest(format!(
                "prompt of {} tokens does not fit the context of {context}",
                prompt.len()
            )));
        }
        let reserved = (prompt.len() + request.max_new_tokens).min(context);
        let row = self.generator.start_row(0, &request, prompt.len())?;
        self.waiting.push_back(Sequence { id, request, prompt, row, fed: Vec::new(), reserved });
        Ok(())
    }

    /// Nothing waiting or running: [`Self::step`] would do nothing.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.prefilling.is_empty() && self.running.seqs.is_empty()
    }

    pub fn load(&self) -> Load {
        let prefill_kv: usize = self.prefilling.iter().map(|p| p.seq.fed.len()).sum();
        Load {
            running: self.running.seqs.iter().filter(|s| !s.finished()).count() + self.prefilling.len(),
            waiting: self.waiting.len(),
            max_running: self.config.max_running,
            kv_budget_tokens: self.config.kv_budget_tokens,
            kv_used_tokens: self.running.seqs.len() * self.running.width + prefill_kv,
            prefix_cache_tokens: self.cache.held_tokens(),
        }
    }

    /// Ends every sequence without an answer (after a failed step, whose state cannot be
    /// trusted) and returns their ids; the prefix cache is kept.
    pub fn abort_all(&mut self) -> Vec<SequenceId> {
        let running = std::mem::take(&mut self.running).seqs.into_iter().filter(|s| !s.finished());
        let prefilling = self.prefilling.drain(..).map(|p| p.seq);
        running.chain(prefilling).chain(self.waiting.drain(..)).map(|s| s.id).collect()
    }

    /// One scheduling step (see the module docs); `on_event` hears every piece and ending.
    pub fn step(&mut self, mut on_event: impl FnMut(SequenceId, Event<'_>)) -> Result<StepReport, EngineError> {
        let started = Instant::now();
        let mut report = StepReport::default();
        self.end_stopped(&mut on_event)?;
        self.admit(&mut report)?;
        let joining = self.prefill(&mut report, &mut on_event)?;
        self.rebuild(joining)?;
        if !self.running.seqs.is_empty() {
            self.decode(&mut report, &mut on_event)?;
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Ends what was cancelled or expired, and waiting rows that ended before starting.
    fn end_stopped(&mut self, on_event: &mut impl FnMut(SequenceId, Event<'_>)) -> Result<(), EngineError> {
        let now = Instant::now();
        let stopped = |seq: &mut Sequence| {
            if seq.row.finish.is_none() {
                seq.row.finish = stop_reason(&seq.request, now);
            }
            seq.finished()
        };
        self.waiting.retain_mut(|seq| {
            let ended = stopped(seq);
            if ended {
                on_event(seq.id, Event::Finished(take_generation(&mut seq.row)));
            }
            !ended
        });
        self.prefilling.retain_mut(|p| {
            let ended = stopped(&mut p.seq);
            if ended {
                on_event(p.seq.id, Event::Finished(take_generation(&mut p.seq.row)));
            }
            !ended
        });
        let running = &mut self.running;
        let newly: Vec<usize> =
            (0..running.seqs.len()).filter(|&b| !running.seqs[b].finished() && stopped(&mut running.seqs[b])).collect();
        if !newly.is_empty() {
            let views = views(&running.kv)?;
            for b in newly {
                retire(&mut running.seqs[b], &views, b, &mut self.cache, on_event);
            }
        }
        Ok(())
    }

    /// Moves waiting sequences to prefill while they fit (oldest first, never skipping one).
    fn admit(&mut self, report: &mut StepReport) -> Result<(), EngineError> {
        let live = self.running.seqs.iter().filter(|s| !s.finished());
        if self.config.policy == BatchingPolicy::Static
            && (live.clone().next().is_some() || !self.prefilling.is_empty())
        {
            return Ok(());
        }
        let mut count = live.clone().count() + self.prefilling.len();
        let mut widest =
            live.map(|s| s.reserved).chain(self.prefilling.iter().map(|p| p.seq.reserved)).max().unwrap_or(0);
        while let Some(next) = self.waiting.front() {
            let wider = widest.max(next.reserved);
            if count + 1 > self.config.max_running || (count + 1) * wider > self.config.kv_budget_tokens {
                break;
            }
            // The last prompt token is always computed: its logits give the first token.
            let hit = self.cache.lookup(&next.prompt, next.prompt.len() - 1);
            let (reused, past) = match hit {
                Some(hit) => {
                    (hit.tokens, hit.kv.into_iter().map(|kv| Ok(Tensor::from_array(kv)?.into_dyn())).collect())
                }
                None => (0, self.generator.empty_past(1)),
            };
            // A failed allocation fails the step; the sequence is still waiting, so it is answered.
            let past = past?;
            let mut seq = self.waiting.pop_front().expect("just seen");
            (count, widest) = (count + 1, wider);
            report.admitted += 1;
            if reused > 0 {
                report.prefix_hits += 1;
                report.cached_tokens += reused;
                seq.row.cached_tokens = reused;
                seq.fed.extend_from_slice(&seq.prompt[..reused]);
            }
            self.prefilling.push_back(Prefill { seq, past });
        }
        Ok(())
    }

    /// Prefills admitted prompts under this step's token budget; returns the sequences whose
    /// prompt is done and who go on generating, with their KV.
    fn prefill(
        &mut self,
        report: &mut StepReport,
        on_event: &mut impl FnMut(SequenceId, Event<'_>),
    ) -> Result<Vec<Prefill>, EngineError> {
        // A static batch prefills everything before it decodes: nobody is waiting on a token.
        let mut budget = match self.config.policy {
            BatchingPolicy::Continuous => self.config.prefill_chunk_tokens,
            BatchingPolicy::Static => usize::MAX,
        };
        let mut joining = Vec::new();
        while budget > 0 {
            let Some(mut p) = self.prefilling.pop_front() else { break };
            let done = p.seq.fed.len();
            let chunk = (p.seq.prompt.len() - done).min(budget);
            budget -= chunk;
            report.prefill_tokens += chunk;
            let ids = &p.seq.prompt[done..done + chunk];
            let input = Array2::from_shape_fn((1, chunk), |(_, t)| i64::from(ids[t]));
            let mask = Array2::<i64>::ones((1, done + chunk));
            let positions = Array2::from_shape_fn((1, chunk), |(_, t)| (done + t) as i64);
            let (logits, presents) = self.generator.run_on_host(&input, &mask, &positions, p.past)?;
            p.past = presents;
            p.seq.fed.extend_from_slice(ids);
            if p.seq.fed.len() < p.seq.prompt.len() {
                self.prefilling.push_front(p);
                continue;
            }
            // The prompt is in: its KV serves later prompts that start the same way.
            let kv = views(&p.past)?;
            self.cache.insert(&p.seq.fed, &kv);
            let vocab = self.generator.spec().vocab_size;
            let seq = &mut p.seq;
            let id = seq.id;
            let token = self.generator.next_token(&mut seq.row, &seq.request, &logits[logits.len() - vocab..])?;
            self.generator.advance(&mut seq.row, &seq.request, token, &mut |_, piece| {
                on_event(id, Event::Piece(piece));
            })?;
            if seq.finished() {
                on_event(seq.id, Event::Finished(take_generation(&mut seq.row)));
            } else {
                joining.push(p);
            }
        }
        Ok(joining)
    }

    /// Drops finished sequences from the running set and adds `joining`, rebuilding the padded
    /// KV when membership changes.
    fn rebuild(&mut self, joining: Vec<Prefill>) -> Result<(), EngineError> {
        let running = &mut self.running;
        if joining.is_empty() && running.seqs.iter().all(|s| !s.finished()) {
            return Ok(());
        }
        let old = std::mem::take(running);
        let kept: Vec<usize> = (0..old.seqs.len()).filter(|&b| !old.seqs[b].finished()).collect();
        let width = kept
            .iter()
            .map(|&b| old.seqs[b].fed.len())
            .chain(joining.iter().map(|p| p.seq.fed.len()))
            .max()
            .unwrap_or(0);
        let rows = kept.len() + joining.len();
        if rows > 0 {
            let old_views = views(&old.kv)?;
            let joining_views: Vec<Vec<ArrayViewD<'_, f32>>> =
                joining.iter().map(|p| views(&p.past)).collect::<Result<_, _>>()?;
            let layers = old_views.len().max(joining_views.first().map_or(0, Vec::len));
            for n in 0..layers {
                let like = old_views.get(n).unwrap_or_else(|| &joining_views[0][n]);
                let (heads, dim) = (like.len_of(Axis(1)), like.len_of(Axis(3)));
                let mut kv = ArrayD::<f32>::zeros(IxDyn(&[rows, heads, width, dim]));
                for (new_b, &b) in kept.iter().enumerate() {
                    let len = old.seqs[b].fed.len();
                    kv.slice_mut(s![new_b, .., width - len.., ..]).assign(&old_views[n].slice(s![
                        b,
                        ..,
                        old.width - len..,
                        ..
                    ]));
                }
                for (j, views) in joining_views.iter().enumerate() {
                    kv.slice_mut(s![kept.len() + j, .., width - views[n].len_of(Axis(2)).., ..])
                        .assign(&views[n].slice(s![0, .., .., ..]));
                }
                running.kv.push(Tensor::from_array(kv)?.into_dyn());
            }
        }
        running.width = width;
        running.seqs =
            old.seqs.into_iter().filter(|s| !s.finished()).chain(joining.into_iter().map(|p| p.seq)).collect();
        Ok(())
    }

    /// One token for every running sequence.
    fn decode(
        &mut self,
        report: &mut StepReport,
        on_event: &mut impl FnMut(SequenceId, Event<'_>),
    ) -> Result<(), EngineError> {
        let running = &mut self.running;
        let (rows, width) = (running.seqs.len(), running.width);
        let next: Vec<u32> =
            running.seqs.iter().map(|s| *s.row.tokens.last().expect("a running sequence has a token")).collect();
        let input = Array2::from_shape_fn((rows, 1), |(b, _)| i64::from(next[b]));
        let mask = Array2::from_shape_fn((rows, width + 1), |(b, t)| i64::from(t + running.seqs[b].fed.len() >= width));
        let positions = Array2::from_shape_fn((rows, 1), |(b, _)| running.seqs[b].fed.len() as i64);
        let past = std::mem::take(&mut running.kv);
        let (logits, presents) = self.generator.run_on_host(&input, &mask, &positions, past)?;
        running.kv = presents;
        running.width += 1;
        report.decoded += rows;
        let vocab = self.generator.spec().vocab_size;
        let seq_len = logits.len() / (vocab * rows);
        let views = views(&running.kv)?;
        for (b, seq) in running.seqs.iter_mut().enumerate() {
            seq.fed.push(next[b]);
            let start = (b * seq_len + seq_len - 1) * vocab;
            let token = self.generator.next_token(&mut seq.row, &seq.request, &logits[start..start + vocab])?;
            let id = seq.id;
            self.generator.advance(&mut seq.row, &seq.request, token, &mut |_, piece| {
                on_event(id, Event::Piece(piece));
            })?;
            if seq.finished() {
                retire(seq, &views, b, &mut self.cache, on_event);
            }
        }
        // Everyone done: the set empties without a copy.
        if running.seqs.iter().all(Sequence::finished) {
            drop(views);
            *running = Running::default();
        }
        Ok(())
    }
}

/// Why a sequence that has not finished must stop now, if it must.
fn stop_reason(request: &GenerationRequest, now: Instant) -> Option<FinishReason> {
    if request.cancel.load(Ordering::Relaxed) {
        Some(FinishReason::Cancelled)
    } else if request.deadline.is_some_and(|d| now >= d) {
        Some(FinishReason::Deadline)
    } else {
        None
    }
}

/// Reports a finished running sequence and keeps its KV (row `b` of `kv`) in the prefix cache:
/// the next turn of its conversation starts with these tokens.
fn retire(
    seq: &mut Sequence,
    kv: &[ArrayViewD<'_, f32>],
    b: usize,
    cache: &mut PrefixCache,
    on_event: &mut impl FnMut(SequenceId, Event<'_>),
) {
    let rows: Vec<ArrayViewD<'_, f32>> = kv.iter().map(|t| t.slice_axis(Axis(0), Slice::from(b..=b))).collect();
    cache.insert(&seq.fed, &rows);
    on_event(seq.id, Event::Finished(take_generation(&mut seq.row)));
}

fn views(kv: &[DynValue]) -> Result<Vec<ArrayViewD<'_, f32>>, EngineError> {
    kv.iter().map(|t| Ok(t.try_extract_array::<f32>()?)).collect()
}
