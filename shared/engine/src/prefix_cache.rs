//! Prefix KV reuse: the KV of token sequences already computed (a system prompt, a
//! conversation's earlier turns with their answers) is kept so a later prompt that starts with
//! the same tokens prefills only what follows.
//!
//! An entry is a token sequence and its KV (per layer, key and value, `[1, heads, len, dim]`).
//! A lookup finds the entry sharing the longest common prefix with the prompt, at token
//! granularity. vLLM hashes fixed-size blocks because its KV lives in paged device blocks; here
//! a sequence's KV is one contiguous host tensor, so matching token by token reuses more (a turn
//! rarely ends on a block boundary) at the cost of a scan over the entries, which is cheap next
//! to a forward pass (a few hundred entries × the prompt's tokens compared).
//!
//! Bounded by a token capacity; the least recently used entries go first. An entry that is a
//! prefix of a newly inserted one is dropped (the new one serves every lookup the old one did),
//! so a conversation holds one entry, not one per turn. One cache per generator, hence per model
//! version: a different model never sees it.
use ndarray::{ArrayD, ArrayViewD, Axis, Slice};

struct Entry {
    tokens: Vec<u32>,
    kv: Vec<ArrayD<f32>>,
    last_used: u64,
}

/// What a lookup found: how many leading tokens of the prompt are covered, and their KV.
pub struct PrefixHit {
    pub tokens: usize,
    pub kv: Vec<ArrayD<f32>>,
}

pub struct PrefixCache {
    capacity_tokens: usize,
    entries: Vec<Entry>,
    held_tokens: usize,
    clock: u64,
}

impl PrefixCache {
    /// A cache holding at most `capacity_tokens` tokens of KV (0 turns it off).
    pub fn new(capacity_tokens: usize) -> Self {
        Self { capacity_tokens, entries: Vec::new(), held_tokens: 0, clock: 0 }
    }

    /// Tokens of KV held.
    pub fn held_tokens(&self) -> usize {
        self.held_tokens
    }

    /// The longest cached prefix of `prompt`, at most `limit` tokens (a prefill must compute at
    /// least the prompt's last token to get its logits); `None` when nothing is shared.
    pub fn lookup(&mut self, prompt: &[u32], limit: usize) -> Option<PrefixHit> {
        let (best, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(_, shared)| shared)?;
        if shared == 0 {
            return None;
        }
        self.clock += 1;
        let entry = &mut self.entries[best];
        entry.last_used = self.clock;
        let kv = entry.kv.iter().map(|t| t.slice_axis(Axis(2), Slice::from(..shared)).to_owned()).collect();
        Some(PrefixHit { tokens: shared, kv })
    }

    /// Keeps the KV of `tokens` (`kv`: per tensor `[1, heads, ≥ len, dim]`, the last `len`
    /// positions along axis 2 being these tokens').
    pub fn insert(&mut self, tokens: &[u32], kv: &[ArrayViewD<'_, f32>]) {
        if tokens.is_empty() || tokens.len() > self.capacity_tokens {
            return;
        }
        // Already covered by an entry that extends it: only mark it used.
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens.starts_with(tokens)) {
            e.last_used = self.clock;
            return;
        }
        let held = &mut self.held_tokens;
        self.entries.retain(|e| {
            let superseded = tokens.starts_with(&e.tokens);
            if superseded {
                *held -= e.tokens.len();
            }
            !superseded
        });
        while self.held_tokens + tokens.len() > self.capacity_tokens {
            let oldest = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i);
            let Some(oldest) = oldest else { break };
            self.held_tokens -= self.entries.swap_remove(oldest).tokens.len();
        }
        let len = tokens.len();
        let kv = kv
            .iter()
            .map(|t| {
                let width = t.len_of(Axis(2));
                t.slice_axis(Axis(2), Slice::from(width - len..)).to_owned()
            })
            .collect();
        self.entries.push(Entry { tokens: tokens.to_vec(), kv, last_used: self.clock });
        self.held_tokens += len;
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use ndarray::{Array, IxDyn};

    use super::*;

    /// One KV tensor whose value at position p is p: slices are easy to check.
    fn kv(len: usize) -> Vec<ArrayD<f32>> {
        vec![Array::from_shape_fn(IxDyn(&[1, 1, len, 1]), |i| i[2] as f32)]
    }

    fn views(kv: &[ArrayD<f32>]) -> Vec<ArrayViewD<'_, f32>> {
        kv.iter().map(|t| t.view()).collect()
    }

    #[test]
    fn the_longest_shared_prefix_is_found_and_capped() {
        let mut cache = PrefixCache::new(100);
        cache.insert(&[1, 2, 3, 4], &views(&kv(4)));
        cache.insert(&[1, 2, 9], &views(&kv(3)));
        let hit = cache.lookup(&[1, 2, 3, 7, 8], 10).unwrap();
        assert_eq!(hit.tokens, 3);
        assert_eq!(hit.kv[0].as_slice().unwrap(), &[0.0, 1.0, 2.0]);
        assert_eq!(cache.lookup(&[1, 2, 3, 4], 3).unwrap().tokens, 3, "the last token is left to compute");
        assert!(cache.lookup(&[5, 6], 10).is_none());
    }

    #[test]
    fn a_longer_sequence_supersedes_its_prefixes_and_a_prefix_adds_nothing() {
        let mut cache = PrefixCache::new(100);
        cache.insert(&[1, 2], &views(&kv(2)));
        cache.insert(&[1, 2, 3, 4], &views(&kv(4)));
        assert_eq!((cache.entries.len(), cache.held_tokens()), (1, 4));
        cache.insert(&[1, 2, 3], &views(&kv(3)));
        assert_eq!((cache.entries.len(), cache.held_tokens()), (1, 4));
    }

    #[test]
    fn the_least_recently_used_entry_goes_when_full() {
        let mut cache = PrefixCache::new(6);
        cache.insert(&[1, 1, 1], &views(&kv(3)));
        cache.insert(&[2, 2, 2], &views(&kv(3)));
        cache.lookup(&[1, 1, 1, 5], 3).unwrap();
        cache.insert(&[3, 3, 3], &views(&kv(3)));
        assert_eq!(cache.held_tokens(), 6);
        assert!(cache.lookup(&[2, 2, 2], 2).is_none(), "the least recently used went");
        assert!(cache.lookup(&[1, 1, 1], 2).is_some());
        cache.insert(&[9; 7], &views(&kv(7)));
        assert!(cache.lookup(&[9; 7], 6).is_none(), "an entry over the whole capacity is not kept");
    }

    #[test]
    fn insert_keeps_the_last_positions_of_a_wider_tensor() {
        let mut cache = PrefixCache::new(10);
        cache.insert(&[4, 5], &views(&kv(5)));
        assert_eq!(cache.lookup(&[4, 5, 6], 2).unwrap().kv[0].as_slice().unwrap(), &[3.0, 4.0]);
    }

    #[test]
    fn a_zero_capacity_cache_keeps_nothing() {
        let mut cache = PrefixCache::new(0);
        cache.insert(&[1], &views(&kv(1)));
        assert!(cache.lookup(&[1, 2], 1).is_none());
    }
}
