//! Batched generation with a KV cache on a decoder-only ONNX graph.
//!
//! Prompts are left-padded to a common length; the attention mask hides the padding and the
//! position ids count only real tokens, so each row computes exactly what it would alone. After
//! the prefill, each step feeds one token per row plus the previous step's `present.*` tensors
//! as `past_key_values.*`. A row that finishes (EOS, length, stop string, deadline, cancel) is
//! removed from the batch — its KV rows are dropped — and the others go on undisturbed. With
//! the KV cache bound in ONNX Runtime's memory (IoBinding: always on CUDA, optional on the CPU)
//! finished rows stay in the batch, fed padding, since device tensors are not cut on the host.
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ndarray::{Array2, ArrayD, Axis};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{Session, SessionInputValue, SessionOutputs};
use ort::value::{DynValue, Tensor};
use tokenizers::Tokenizer;

use crate::EngineError;
use crate::constrain::{Constraint, Grammars, OutputGrammar};
use crate::sampling::{Sampler, SamplingParams};

/// The shape facts of a decoder graph (from the manifest).
#[derive(Debug, Clone)]
pub struct DecoderSpec {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
}

/// One request of a batch.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: String,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub deadline: Option<Instant>,
    /// Set from outside to stop this request; the rest of the batch goes on.
    pub cancel: Arc<AtomicBool>,
    /// What the output must match (constrained decoding, see [`crate::constrain`]).
    pub grammar: Option<OutputGrammar>,
    /// Report each generated token's log probability with this many top alternatives.
    pub logprobs: Option<usize>,
    /// Generate exactly `max_new_tokens`, going on past EOS (benchmarks: equal lengths whatever
    /// the text, as vLLM's `ignore_eos`).
    pub ignore_eos: bool,
}

impl GenerationRequest {
    pub fn new(prompt: impl Into<String>, max_new_tokens: usize) -> Self {
        Self {
            prompt: prompt.into(),
            max_new_tokens,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            deadline: None,
            cancel: Arc::default(),
            grammar: None,
            logprobs: None,
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Length,
    Stop,
    Deadline,
    Cancelled,
    /// Not generated: the request's response format is invalid (see `Generation::refusal`).
    Refused,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::Length => "length",
            Self::Stop => "stop",
            Self::Deadline => "deadline",
            Self::Cancelled => "cancelled",
            Self::Refused => "refused",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    /// Of `prompt_tokens`, how many had their KV reused from the prefix cache, not computed.
    pub cached_tokens: usize,
    pub finish: FinishReason,
    /// Why a `Refused` request was not generated.
    pub refusal: Option<String>,
    /// Per generated token, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
}

/// A generated token's log probability under the model (log-softmax of its raw logits, before
/// penalties and constraints), and the most likely alternatives at that step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// A decoder session with its tokenizer. `Session::run` takes `&mut self`: one per worker.
pub struct Generator {
    session: Session,
    tokenizer: Tokenizer,
    spec: DecoderSpec,
    /// Where ONNX Runtime keeps the KV cache between steps when it is bound (IoBinding) rather
    /// than copied out and back each step: device memory on a GPU, so only the logits cross.
    kv_memory: Option<MemoryInfo<'static>>,
    /// Compiles response formats for this vocabulary; built on first use.
    grammars: Option<Grammars>,
}

/// The state of one row while it generates.
pub(crate) struct Row {
    pub(crate) index: usize,
    sampler: Sampler,
    pub(crate) tokens: Vec<u32>,
    /// Text of `tokens` and how much of it has been streamed.
    text: String,
    emitted: usize,
    pub(crate) finish: Option<FinishReason>,
    prompt_tokens: usize,
    /// Of `prompt_tokens`, how many had their KV from the prefix cache.
    pub(crate) cached_tokens: usize,
    /// The output's grammar, for a request with a response format.
    constraint: Option<Constraint>,
    refusal: Option<String>,
    logprobs: Vec<TokenLogprob>,
}

impl Generator {
    pub fn new(session: Session, tokenizer: Tokenizer, spec: DecoderSpec) -> Self {
        Self { session, tokenizer, spec, kv_memory: None, grammars: None }
    }

    /// Keeps the KV cache in `memory` (via IoBinding) between steps. Finished rows then stay in
    /// the batch, fed padding, instead of being cut out of a cache the host cannot reach.
    pub fn with_bound_kv(mut self, memory: MemoryInfo<'static>) -> Self {
        self.kv_memory = Some(memory);
        self
    }

    /// `token`'s log probability among `logits`, and the `top` most likely tokens'.
    fn logprob(&self, logits: &[f32], token: u32, top: usize) -> Result<TokenLogprob, EngineError> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
        let piece = |id: u32| self.tokenizer.decode(&[id], false).map_err(|e| EngineError::Tokenizer(e.to_string()));
        let mut best: Vec<u32> = (0..logits.len() as u32).collect();
        let top = top.min(best.len());
        if top > 0 {
            best.select_nth_unstable_by(top - 1, |a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
            best.truncate(top);
            best.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        } else {
            best.clear();
        }
        Ok(TokenLogprob {
            token: piece(token)?,
            logprob: logits[token as usize] - log_sum,
            top: best
                .into_iter()
                .map(|id| Ok((piece(id)?, logits[id as usize] - log_sum)))
                .collect::<Result<_, EngineError>>()?,
        })
    }

    /// The response-format compiler for this vocabulary (built once, on first use: reading the
    /// vocabulary into llguidance's token trie takes a moment).
    fn grammars(&mut self) -> Result<&Grammars, EngineError> {
        if self.grammars.is_none() {
            let eos = *self.spec.eos_token_ids.first().unwrap_or(&self.spec.pad_token_id);
            self.grammars = Some(Grammars::new(&self.tokenizer, self.spec.vocab_size, eos)?);
        }
        Ok(self.grammars.as_ref().expect("just built"))
    }

    pub fn spec(&self) -> &DecoderSpec {
        &self.spec
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Generates for every request together. `on_token(i, piece)` streams request `i`'s text as
    /// it is produced (pieces concatenate to the final text).
    pub fn generate(
        &mut self,
        requests: &[GenerationRequest],
        mut on_token: impl FnMut(usize, &str),
    ) -> Result<Vec<Generation>, EngineError> {
        let prompts: Vec<Vec<u32>> = requests.iter().map(|r| self.encode(&r.prompt)).collect::<Result<_, _>>()?;
        for (ids, r) in prompts.iter().zip(requests) {
            if ids.is_empty() {
                return Err(EngineError::InvalidRequest("empty prompt".into()));
            }
            if ids.len() + r.max_new_tokens.min(1) > self.spec.context_length {
                return Err(EngineError::InvalidRequest(format!(
                    "prompt of {} tokens does not fit the context of {}",
                    ids.len(),
                    self.spec.context_length
                )));
            }
        }
        let mut rows: Vec<Row> = Vec::with_capacity(requests.len());
        for (index, (r, ids)) in requests.iter().zip(&prompts).enumerate() {
            rows.push(self.start_row(index, r, ids.len())?);
        }
        let mut active: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].finish.is_none()).collect();
        if active.is_empty() {
            return Ok(rows.into_iter().map(finished).collect());
        }

        // Prefill: all prompts, left-padded.
        let width = active.iter().map(|&i| prompts[i].len()).max().unwrap_or(0);
        let mut mask = Array2::<i64>::zeros((active.len(), width));
        let mut input_ids = Array2::<i64>::from_elem((active.len(), width), i64::from(self.spec.pad_token_id));
        for (b, &i) in active.iter().enumerate() {
            let pad = width - prompts[i].len();
            for (t, &id) in prompts[i].iter().enumerate() {
                input_ids[[b, pad + t]] = i64::from(id);
                mask[[b, pad + t]] = 1;
            }
        }
        let mut past = self.empty_past(active.len())?;
        let mut step_ids = input_ids;
        loop {
            let positions = positions_for(&mask, step_ids.ncols());
            let (logits, presents) = self.run(&step_ids, &mask, &positions, past)?;
            past = presents;
            let vocab = self.spec.vocab_size;
            // Graphs score the last position only ([batch, 1, vocab]); older ones score all.
            let seq = logits.len() / (vocab * active.len());
            let mut next = Vec::with_capacity(active.len());
            for (b, &i) in active.iter().enumerate() {
                if rows[i].finish.is_some() {
                    next.push(self.spec.pad_token_id);
                    continue;
                }
                let start = (b * seq + seq - 1) * vocab;
                let token = self.next_token(&mut rows[i], &requests[i], &logits[start..start + vocab])?;
                self.advance(&mut rows[i], &requests[i], token, &mut on_token)?;
                next.push(token);
            }
            let keep: Vec<usize> = (0..active.len()).filter(|&b| rows[active[b]].finish.is_none()).collect();
            if keep.is_empty() {
                break;
            }
            // Drop finished rows from the batch and their KV rows (when the host holds them).
            if self.kv_memory.is_none() && keep.len() < active.len() {
                past = past.into_iter().map(|kv| select_rows(kv, &keep)).collect::<Result<_, _>>()?;
                mask = mask.select(Axis(0), &keep);
                active = keep.iter().map(|&b| active[b]).collect();
                next = keep.iter().map(|&b| next[b]).collect();
            }
            let ones = Array2::<i64>::ones((active.len(), 1));
            mask = ndarray::concatenate(Axis(1), &[mask.view(), ones.view()]).expect("same row count");
            step_ids = Array2::from_shape_fn((active.len(), 1), |(b, _)| i64::from(next[b]));
        }
        Ok(rows.into_iter().map(finished).collect())
    }

    /// Greedy generation recomputing the whole sequence every step, without a KV cache: the
    /// reference the cached path is tested against.
    pub fn generate_uncached(&mut self, prompt: &str, max_new_tokens: usize) -> Result<Vec<u32>, EngineError> {
        let mut ids: Vec<i64> = self.encode(prompt)?.into_iter().map(i64::from).collect();
        let mut out = Vec::new();
        for _ in 0..max_new_tokens {
            let n = ids.len();
            let input = Array2::from_shape_vec((1, n), ids.clone()).expect("shape");
            let mask = Array2::<i64>::ones((1, n));
            let positions = positions_for(&mask, n);
            let (logits, _) = self.run(&input, &mask, &positions, self.empty_past(1)?)?;
            let vocab = self.spec.vocab_size;
            let token = crate::sampling::argmax(&logits[logits.len() - vocab..]);
            out.push(token);
            if self.spec.eos_token_ids.contains(&token) {
                break;
            }
            ids.push(i64::from(token));
        }
        Ok(out)
    }

    pub(crate) fn empty_past(&self, batch: usize) -> Result<Vec<DynValue>, EngineError> {
        (0..self.spec.num_layers * 2)
            .map(|_| {
                let shape = [batch, self.spec.num_kv_heads, 0, self.spec.head_dim];
                Ok(Tensor::from_array((shape, Vec::<f32>::new()))?.into_dyn())
            })
            .collect()
    }

    /// One forward pass: returns the logits (flattened [batch, 1 or seq, vocab]) and the presents
    /// (key, value per layer, in order).
    fn run(
        &mut self,
        input_ids: &Array2<i64>,
        mask: &Array2<i64>,
        positions: &Array2<i64>,
        past: Vec<DynValue>,
    ) -> Result<(Vec<f32>, Vec<DynValue>), EngineError> {
        match self.kv_memory.clone() {
            Some(memory) => self.run_bound(&memory, input_ids, mask, positions, past),
            None => self.run_on_host(input_ids, mask, positions, past),
        }
    }

    /// The pass with every tensor on the host: ONNX Runtime copies them to the device and back
    /// when a GPU runs. The scheduler's KV is cut and joined on the host between steps.
    pub(crate) fn run_on_host(
        &mut self,
        input_ids: &Array2<i64>,
        mask: &Array2<i64>,
        positions: &Array2<i64>,
        past: Vec<DynValue>,
    ) -> Result<(Vec<f32>, Vec<DynValue>), EngineError> {
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            ("input_ids".into(), Tensor::from_array(input_ids.clone())?.into_dyn().into()),
            ("attention_mask".into(), Tensor::from_array(mask.clone())?.into_dyn().into()),
            ("position_ids".into(), Tensor::from_array(positions.clone())?.into_dyn().into()),
        ];
        for (n, value) in past.into_iter().enumerate() {
            inputs.push((kv_name("past_key_values", n).into(), value.into()));
        }
        let outputs = self.session.run(inputs)?;
        take_outputs(outputs, self.spec.num_layers)
    }

    /// The same pass through an IoBinding: presents stay in `memory` and are bound as the next
    /// step's past without a copy; only the logits come to the host.
    fn run_bound(
        &mut self,
        memory: &MemoryInfo,
        input_ids: &Array2<i64>,
        mask: &Array2<i64>,
        positions: &Array2<i64>,
        past: Vec<DynValue>,
    ) -> Result<(Vec<f32>, Vec<DynValue>), EngineError> {
        let mut binding = self.session.create_binding()?;
        binding.bind_input("input_ids", &Tensor::from_array(input_ids.clone())?)?;
        binding.bind_input("attention_mask", &Tensor::from_array(mask.clone())?)?;
        binding.bind_input("position_ids", &Tensor::from_array(positions.clone())?)?;
        for (n, value) in past.iter().enumerate() {
            binding.bind_input(kv_name("past_key_values", n), value)?;
        }
        let host = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?;
        binding.bind_output_to_device("logits", &host)?;
        for n in 0..self.spec.num_layers * 2 {
            binding.bind_output_to_device(kv_name("present", n), memory)?;
        }
        let outputs = self.session.run_binding(&binding)?;
        take_outputs(outputs, self.spec.num_layers)
    }

    /// A row for `request` (a prompt of `prompt_tokens`), finished at once when it asks for no
    /// tokens or its response format does not compile (which refuses this request alone).
    pub(crate) fn start_row(
        &mut self,
        index: usize,
        request: &GenerationRequest,
        prompt_tokens: usize,
    ) -> Result<Row, EngineError> {
        let (constraint, refusal) = match &request.grammar {
            None => (None, None),
            Some(grammar) => match self.grammars()?.constraint(grammar) {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        let finish = match (&refusal, request.max_new_tokens) {
            (Some(_), _) => Some(FinishReason::Refused),
            (None, 0) => Some(FinishReason::Length),
            (None, _) => None,
        };
        Ok(Row {
            index,
            sampler: Sampler::new(request.sampling.clone()),
            tokens: Vec::new(),
            text: String::new(),
            emitted: 0,
            finish,
            prompt_tokens,
            cached_tokens: 0,
            constraint,
            refusal,
            logprobs: Vec::new(),
        })
    }

    /// Picks the row's next token from its logits (under its grammar, if any) and records its
    /// log probability when the request asked.
    pub(crate) fn next_token(
        &self,
        row: &mut Row,
        request: &GenerationRequest,
        logits: &[f32],
    ) -> Result<u32, EngineError> {
        let token = match row.constraint.as_mut() {
            None => row.sampler.next_token(logits),
            Some(constraint) => {
                let mut masked = logits.to_vec();
                constraint.mask(&mut masked)?;
                let token = row.sampler.next_token(&masked);
                if !self.spec.eos_token_ids.contains(&token) {
                    constraint.consume(token)?;
                }
                token
            }
        };
        if let Some(top) = request.logprobs
            && !self.spec.eos_token_ids.contains(&token)
        {
            row.logprobs.push(self.logprob(logits, token, top)?);
        }
        Ok(token)
    }

    /// Appends `token` to the row, streams what is safe to stream, and decides if it is done.
    pub(crate) fn advance(
        &self,
        row: &mut Row,
        request: &GenerationRequest,
        token: u32,
        on_token: &mut impl FnMut(usize, &str),
    ) -> Result<(), EngineError> {
        if self.spec.eos_token_ids.contains(&token) && !request.ignore_eos {
            row.finish = Some(FinishReason::Eos);
        } else {
            row.tokens.push(token);
            row.text = self.tokenizer.decode(&row.tokens, true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            if let Some(at) = request.stop.iter().filter_map(|s| row.text.find(s.as_str())).min() {
                row.text.truncate(at);
                row.finish = Some(FinishReason::Stop);
            } else if row.tokens.len() >= request.max_new_tokens
                || row.prompt_tokens + row.tokens.len() >= self.spec.context_length
            {
                row.finish = Some(FinishReason::Length);
            }
        }
        if row.finish.is_none() {
            if request.cancel.load(Ordering::Relaxed) {
                row.finish = Some(FinishReason::Cancelled);
            } else if request.deadline.is_some_and(|d| Instant::now() >= d) {
                row.finish = Some(FinishReason::Deadline);
            }
        }
        // Hold back an incomplete UTF-8 sequence and anything that may begin a stop string.
        let upto = if row.finish.is_some() { row.text.len() } else { streamable_len(&row.text, &request.stop) };
        if upto > row.emitted && row.text.is_char_boundary(row.emitted) {
            on_token(row.index, &row.text[row.emitted..upto]);
            row.emitted = upto;
        }
        Ok(())
    }
}

/// The logits (flattened [batch, seq, vocab], on the host) and the presents, in order.
fn take_outputs(mut outputs: SessionOutputs<'_>, num_layers: usize) -> Result<(Vec<f32>, Vec<DynValue>), EngineError> {
    let logits = outputs.remove("logits").ok_or_else(|| EngineError::Model("no `logits` output".into()))?;
    let logits = logits.try_extract_tensor::<f32>()?.1.to_vec();
    let presents = (0..num_layers * 2)
        .map(|n| {
            let name = kv_name("present", n);
            outputs.remove(&name).ok_or_else(|| EngineError::Model(format!("no `{name}` output")))
        })
        .collect::<Result<_, _>>()?;
    Ok((logits, presents))
}

/// `<prefix>.<layer>.key` for even `n`, `.value` for odd: the KV tensors in order.
fn kv_name(prefix: &str, n: usize) -> String {
    format!("{prefix}.{}.{}", n / 2, if n.is_multiple_of(2) { "key" } else { "value" })
}

fn finished(mut row: Row) -> Generation {
    take_generation(&mut row)
}

/// The finished row's generation, taken out of it (what is left is a husk).
pub(crate) fn take_generation(row: &mut Row) -> Generation {
    Generation {
        text: std::mem::take(&mut row.text),
        token_ids: std::mem::take(&mut row.tokens),
        prompt_tokens: row.prompt_tokens,
        cached_tokens: row.cached_tokens,
        finish: row.finish.unwrap_or(FinishReason::Length),
        refusal: row.refusal.take(),
        logprobs: std::mem::take(&mut row.logprobs),
    }
}

/// Position ids of the last `width` columns of `mask`: each real token counts the real tokens
/// before it; padding gets 0.
fn positions_for(mask: &Array2<i64>, width: usize) -> Array2<i64> {
    let total = mask.ncols();
    let mut positions = Array2::<i64>::zeros((mask.nrows(), width));
    for (b, row) in mask.rows().into_iter().enumerate() {
        let mut seen = 0i64;
        for (t, &m) in row.iter().enumerate() {
            if t >= total - width {
                positions[[b, t + width - total]] = if m == 1 { seen } else { 0 };
            }
            seen += m;
        }
    }
    positions
}

/// Keeps rows `keep` (axis 0) of a KV tensor.
fn select_rows(kv: DynValue, keep: &[usize]) -> Result<DynValue, EngineError> {
    let view = kv.try_extract_array::<f32>()?;
    let kept: ArrayD<f32> = view.select(Axis(0), keep);
    Ok(Tensor::from_array(kept)?.into_dyn())
}

/// How much of `text` can be streamed now: not a trailing U+FFFD (an incomplete UTF-8 sequence
/// that the next token completes) and not a suffix that could be the start of a stop string.
fn streamable_len(text: &str, stops: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if text[..end].ends_with(&stop[..i]) {
                end = end.min(end - i);
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_real_tokens_only() {
        let mask = ndarray::array![[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]];
        assert_eq!(positions_for(&mask, 5), ndarray::array![[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]);
        assert_eq!(positions_for(&mask, 1), ndarray::array![[2], [4]]);
    }

    #[test]
    fn a_possible_stop_string_start_is_held_back() {
        let stops = vec!["<END>".to_owned()];
        assert_eq!(streamable_len("Hello <E", &stops), "Hello ".len());
        assert_eq!(streamable_len("Hello", &stops), 5);
        assert_eq!(streamable_len("ab\u{FFFD}", &[]), 2);
    }
}
