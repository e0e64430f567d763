//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling from a
//! seeded generator, so a request with a seed is reproducible. Presence and frequency
//! penalties (as OpenAI defines them) lower the logits of tokens this request already
//! generated before either.
use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How one request picks its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    /// 1 = no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
    /// Subtracted once from the logit of every token generated so far.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated so far.
    pub frequency_penalty: f32,
    /// Added to these tokens' logits (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

/// Per-request sampler state (its own random stream).
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// How often each token was generated, kept only when a penalty needs it.
    generated: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Self { params, rng, generated: HashMap::new() }
    }

    pub fn next_token(&mut self, logits: &[f32]) -> u32 {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence == 0.0 && frequency == 0.0 && self.params.logit_bias.is_empty() {
            return self.pick(logits);
        }
        let mut penalized = logits.to_vec();
        for &(token, bias) in &self.params.logit_bias {
            if let Some(l) = penalized.get_mut(token as usize) {
                *l += bias;
            }
        }
        for (&token, &count) in &self.generated {
            if let Some(l) = penalized.get_mut(token as usize) {
                *l -= presence + frequency * count as f32;
            }
        }
        let token = self.pick(&penalized);
        *self.generated.entry(token).or_default() += 1;
        token
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        // Highest first; ties by token id so the order (and so the draw) is deterministic.
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| ((l - max) / self.params.temperature).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= self.params.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut draw: f32 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if draw < *p {
                return candidates[i].0;
            }
            draw -= p;
        }
        candidates[probs.len() - 1].0
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGITS: [f32; 6] = [0.1, 2.0, 1.9, -1.0, 0.5, 1.0];

    fn draws(params: SamplingParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params);
        (0..n).map(|_| s.next_token(&LOGITS)).collect()
    }

    #[test]
    fn greedy_takes_the_highest_logit() {
        assert_eq!(draws(SamplingParams::default(), 3), [1, 1, 1]);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_another_seed_differs() {
        let p = SamplingParams { temperature: 1.5, seed: 42, ..Default::default() };
        assert_eq!(draws(p.clone(), 50), draws(p.clone(), 50));
        assert_ne!(draws(p.clone(), 50), draws(SamplingParams { seed: 43, ..p }, 50));
    }

    #[test]
    fn penalties_steer_away_from_tokens_already_generated() {
        // Greedy repeats token 1; a presence penalty above its lead (0.1 over token 2) moves on
        // to 2, and once both are penalized alike, 1 leads again.
        assert_eq!(draws(SamplingParams { presence_penalty: 0.5, ..Default::default() }, 3), [1, 2, 1]);
        // A frequency penalty grows with each repeat: 1 leads by 0.1, then 1 and 2 alternate
        // as each is penalized in turn.
        assert_eq!(draws(SamplingParams { frequency_penalty: 0.15, ..Default::default() }, 4), [1, 2, 1, 2]);
        // A bias moves a token up or down the order.
        assert_eq!(draws(SamplingParams { logit_bias: vec![(3, 5.0)], ..Default::default() }, 2), [3, 3]);
        assert_eq!(draws(SamplingParams { logit_bias: vec![(1, -100.0)], ..Default::default() }, 1), [2]);
        // A negative penalty favours repeats.
        assert_eq!(draws(SamplingParams { presence_penalty: -1.0, ..Default::default() }, 3), [1, 1, 1]);
    }

    #[test]
    fn top_k_and_top_p_only_draw_from_the_head() {
        let k2 = draws(SamplingParams { temperature: 5.0, top_k: 2, seed: 1, ..Default::default() }, 200);
        assert!(k2.iter().all(|t| [1, 2].contains(t)));
        assert!(k2.contains(&1) && k2.contains(&2));
        let p = draws(SamplingParams { temperature: 1.0, top_p: 0.5, seed: 1, ..Default::default() }, 200);
        assert!(p.iter().all(|t| [1, 2].contains(t)), "{p:?}");
    }
}
