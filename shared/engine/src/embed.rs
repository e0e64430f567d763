//! Sentence embeddings: an encoder's `last_hidden_state`, mean-pooled over the attention mask
//! and L2-normalized.
use std::borrow::Cow;

use ndarray::Array2;
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use tokenizers::Tokenizer;

use crate::EngineError;

pub struct Embedder {
    session: Session,
    tokenizer: Tokenizer,
}

impl Embedder {
    pub fn new(session: Session, tokenizer: Tokenizer) -> Self {
        Self { session, tokenizer }
    }

    /// One embedding per text, with the number of tokens the encoder read for it.
    pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<Embedded>, EngineError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings =
            self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let width = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let (b, w) = (encodings.len(), width);
        let mut ids = Array2::<i64>::zeros((b, w));
        let mut mask = Array2::<i64>::zeros((b, w));
        for (r, e) in encodings.iter().enumerate() {
            for (t, (&id, &m)) in e.get_ids().iter().zip(e.get_attention_mask()).enumerate() {
                ids[[r, t]] = i64::from(id);
                mask[[r, t]] = i64::from(m);
            }
        }
        let wanted: Vec<String> = self.session.inputs().iter().map(|i| i.name().to_owned()).collect();
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::new();
        for name in &wanted {
            let value = match name.as_str() {
                "input_ids" => Tensor::from_array(ids.clone())?,
                "attention_mask" => Tensor::from_array(mask.clone())?,
                "token_type_ids" => Tensor::from_array(Array2::<i64>::zeros((b, w)))?,
                other => return Err(EngineError::Model(format!("unexpected encoder input `{other}`"))),
            };
            inputs.push((name.clone().into(), value.into_dyn().into()));
        }
        let outputs = self.session.run(inputs)?;
        let (shape, hidden) = outputs[0].try_extract_tensor::<f32>()?;
        let dim = *shape.last().ok_or_else(|| EngineError::Model("scalar hidden state".into()))? as usize;
        Ok((0..b)
            .map(|r| {
                let mut pooled = vec![0f32; dim];
                let mut count = 0f32;
                for t in 0..w {
                    if mask[[r, t]] == 1 {
                        let at = (r * w + t) * dim;
                        pooled.iter_mut().zip(&hidden[at..at + dim]).for_each(|(p, h)| *p += h);
                        count += 1.0;
                    }
                }
                pooled.iter_mut().for_each(|p| *p /= count.max(1.0));
                let norm = pooled.iter().map(|p| p * p).sum::<f32>().sqrt().max(1e-12);
                pooled.iter_mut().for_each(|p| *p /= norm);
                Embedded { vector: pooled, tokens: count as u32 }
            })
            .collect())
    }
}

/// A text's embedding (L2-normalized) and its length in the encoder's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub vector: Vec<f32>,
    pub tokens: u32,
}

/// Cosine similarity (the embeddings are normalized, so a dot product).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
