//! Token counting with each generation model's own tokenizer, and cutting a text to a token
//! budget.
use std::collections::BTreeMap;
use std::path::Path;

use millrace_engine::Manifest;
use millrace_engine::manifest::ModelKind;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("model manifest: {0}")]
    Manifest(String),
    #[error("the manifest has no generation model")]
    NoModels,
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// One generation model as this stage needs it: how it counts tokens and how many fit.
pub struct ModelTokenizer {
    tokenizer: Tokenizer,
    context_length: usize,
}

impl ModelTokenizer {
    pub fn new(mut tokenizer: Tokenizer, context_length: usize) -> Self {
        // Counting must see every token: no truncation or padding a tokenizer.json may ask for.
        tokenizer.with_truncation(None).expect("disabling truncation cannot fail");
        tokenizer.with_padding(None);
        Self { tokenizer, context_length }
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Tokens of `text` as the model sees it in a prompt (no special tokens: the chat template
    /// adds those, and `--reserve-tokens` leaves room for them).
    pub fn count(&self, text: &str) -> Result<usize, BudgetError> {
        // No offsets needed to count.
        let encoding = self.tokenizer.encode_fast(text, false).map_err(|e| BudgetError::Tokenizer(e.to_string()))?;
        Ok(encoding.len())
    }

    fn encode(&self, text: &str) -> Result<tokenizers::Encoding, BudgetError> {
        self.tokenizer.encode(text, false).map_err(|e| BudgetError::Tokenizer(e.to_string()))
    }

    /// The longest prefix of `text` ending on a token boundary within `max_tokens` tokens, and
    /// its token count; `None` when `text` already fits. The prefix is cut from the text at the
    /// last kept token's end offset (exactly the original characters; decoding token ids back
    /// could turn a character split between tokens into U+FFFD) and re-counted, because a
    /// prefix can tokenize differently at its new end.
    pub fn truncate(&self, text: &str, max_tokens: usize) -> Result<Option<(String, usize)>, BudgetError> {
        let encoding = self.encode(text)?;
        if encoding.len() <= max_tokens {
            return Ok(None);
        }
        let offsets = encoding.get_offsets();
        let mut keep = max_tokens;
        while keep > 0 {
            let mut end = offsets[keep - 1].1.min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let prefix = text[..end].trim_end();
            let count = self.count(prefix)?;
            if count <= max_tokens {
                return Ok(Some((prefix.to_owned(), count)));
            }
            keep -= (count - max_tokens).min(keep);
        }
        Ok(Some((String::new(), 0)))
    }
}

/// The tokenizers of every generation model in the manifest, by name.
pub struct TokenModels {
    models: BTreeMap<String, ModelTokenizer>,
}

impl TokenModels {
    pub fn new(models: impl IntoIterator<Item = (String, ModelTokenizer)>) -> Self {
        Self { models: models.into_iter().collect() }
    }

    /// Loads `<dir>/manifest.json` and the tokenizer of each of its generation models.
    pub fn load(dir: &Path) -> Result<Self, BudgetError> {
        let manifest = Manifest::load(dir).map_err(|e| BudgetError::Manifest(e.to_string()))?;
        Self::from_manifest(&manifest)
    }

    pub fn from_manifest(manifest: &Manifest) -> Result<Self, BudgetError> {
        let mut models = BTreeMap::new();
        for entry in manifest.models_of(ModelKind::Generate) {
            let tokenizer = manifest.model_tokenizer(&entry.name).map_err(|e| BudgetError::Manifest(e.to_string()))?;
            models.insert(entry.name.clone(), ModelTokenizer::new(tokenizer, entry.context_length));
        }
        if models.is_empty() {
            return Err(BudgetError::NoModels);
        }
        Ok(Self { models })
    }

    pub fn get(&self, model: &str) -> Option<&ModelTokenizer> {
        self.models.get(model)
    }

    /// The model names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.models.keys().map(String::as_str).collect()
    }
}
