//! Text classification with a model taking `text` strings [N, 1] and giving class
//! `probabilities` [N, C]; the score is the probability of the positive class (index 1).
use ort::session::Session;
use ort::value::Tensor;

use crate::EngineError;

pub struct Classifier {
    session: Session,
}

impl Classifier {
    pub fn new(session: Session) -> Self {
        Self { session }
    }

    /// One score in [0, 1] per text.
    pub fn scores(&mut self, texts: &[&str]) -> Result<Vec<f32>, EngineError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let owned: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
        let input = Tensor::from_string_array(([texts.len(), 1], owned.as_slice()))?;
        let outputs = self.session.run(ort::inputs!["text" => input])?;
        let probabilities =
            outputs.get("probabilities").ok_or_else(|| EngineError::Model("no `probabilities` output".into()))?;
        let (shape, p) = probabilities.try_extract_tensor::<f32>()?;
        let classes = shape.get(1).copied().unwrap_or(1) as usize;
        if classes < 2 {
            return Err(EngineError::Model(format!("expected two or more classes, got shape {shape:?}")));
        }
        Ok((0..texts.len()).map(|r| p[r * classes + 1]).collect())
    }
}
