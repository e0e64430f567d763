//! Building a prompt: the model's chat template over a system message, the earlier
//! conversation and the new user text, trimmed to the model's token budget.
//!
//! The earlier conversation is a list of *units*, oldest first: a stored exchange (user +
//! assistant, in a session) is one unit; each message a client sent before its new turn
//! (OpenAI's `messages`) is one unit. The system message is the request's own when it sent
//! one, else the policy's; it is never trimmed.
//!
//! The budget is `context_length − reserve_tokens` (the reserve is room for the answer). When
//! the whole conversation does not fit, the **oldest** units are dropped until the rendered
//! prompt — counted with the model's own tokenizer, template markers included — fits. The
//! number of units kept is the prompt's `turns_used`.
//!
//! When even the prompt without any history is over the budget (preprocess checks the user
//! text against its own budget, which may differ), it goes out without history as long as it
//! fits the context window at all; past the window it is refused as `too_many_tokens`.
use std::collections::BTreeMap;
use std::path::Path;

use millrace_engine::manifest::ModelKind;
use millrace_engine::{ChatMessage, ChatTemplate, Manifest};
use tokenizers::Tokenizer;
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The prompt with no history is longer than the model's context window.
    #[error("the prompt has {tokens} tokens without any history; the model's context window is {context_length}")]
    TooLong { tokens: usize, context_length: usize },
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("models: {0}")]
    Models(String),
}

/// How a model counts tokens.
pub trait TokenCount: Send + Sync {
    fn count(&self, text: &str) -> Result<usize, PromptError>;
}

impl TokenCount for Tokenizer {
    fn count(&self, text: &str) -> Result<usize, PromptError> {
        // As inference encodes a prompt: the template already wrote the special tokens.
        self.encode(text, false).map(|e| e.len()).map_err(|e| PromptError::Tokenizer(e.to_string()))
    }
}

/// One generation model as this stage needs it.
pub struct PromptModel<C = Tokenizer> {
    template: ChatTemplate,
    counter: C,
    context_length: usize,
}

/// What a prompt is built from (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    /// The request's own system message, if it sent one.
    pub system: Option<String>,
    /// Trimmable units, oldest first.
    pub earlier: Vec<Vec<ChatMessage>>,
    pub user_text: String,
}

impl Conversation {
    /// Stored `history` (`(user, assistant)` pairs, oldest first), then the request's earlier
    /// `messages` (`(role, content)`; system ones become the system message), then `user_text`.
    pub fn of<'a>(
        history: &[(String, String)],
        messages: impl IntoIterator<Item = (&'a str, &'a str)>,
        user_text: &str,
    ) -> Self {
        let mut earlier: Vec<Vec<ChatMessage>> = history
            .iter()
            .map(|(user, assistant)| vec![ChatMessage::new("user", user), ChatMessage::new("assistant", assistant)])
            .collect();
        let mut system: Vec<&str> = Vec::new();
        for (role, content) in messages {
            if role == "system" {
                system.push(content);
            } else {
                earlier.push(vec![ChatMessage::new(role, content)]);
            }
        }
        let system = (!system.is_empty()).then(|| system.join("\n\n"));
        Self { system, earlier, user_text: user_text.to_owned() }
    }
}

/// A rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub prompt: String,
    pub prompt_tokens: usize,
    /// Units of the earlier conversation in the prompt (the newest ones).
    pub turns_used: usize,
    /// Units left out for the budget (the oldest ones).
    pub turns_dropped: usize,
}

/// What a prompt is made of besides the conversation.
#[derive(Debug, Clone, Default)]
pub struct PromptPolicy {
    /// The system message; `None` renders none (a template may then add its own default).
    pub system_prompt: Option<String>,
    pub reserve_tokens: usize,
}

impl<C: TokenCount> PromptModel<C> {
    pub fn new(template: ChatTemplate, counter: C, context_length: usize) -> Self {
        Self { template, counter, context_length }
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    pub fn count(&self, text: &str) -> Result<usize, PromptError> {
        self.counter.count(text)
    }

    /// Renders the system message + the last `keep` units + the user text.
    fn render(&self, policy: &PromptPolicy, c: &Conversation, keep: usize) -> Result<(String, usize), PromptError> {
        let kept = &c.earlier[c.earlier.len() - keep..];
        let mut messages = Vec::with_capacity(2 + kept.iter().map(Vec::len).sum::<usize>());
        if let Some(system) = c.system.as_ref().or(policy.system_prompt.as_ref()) {
            messages.push(ChatMessage::new("system", system));
        }
        messages.extend(kept.iter().flatten().cloned());
        messages.push(ChatMessage::new("user", &c.user_text));
        let prompt = self.template.render(&messages, true).map_err(|e| PromptError::Template(e.to_string()))?;
        let tokens = self.counter.count(&prompt)?;
        Ok((prompt, tokens))
    }

    /// A prompt sent as it is (a legacy completion's): counted, refused past the context window.
    pub fn raw(&self, prompt: &str) -> Result<Built, PromptError> {
        let tokens = self.counter.count(prompt)?;
        if tokens > self.context_length {
            return Err(PromptError::TooLong { tokens, context_length: self.context_length });
        }
        Ok(Built { prompt: prompt.to_owned(), prompt_tokens: tokens, turns_used: 0, turns_dropped: 0 })
    }

    /// The prompt for the conversation, with as many of its newest units as the budget holds
    /// (see the module docs).
    pub fn build(&self, policy: &PromptPolicy, c: &Conversation) -> Result<Built, PromptError> {
        let units = c.earlier.len();
        let budget = self.context_length.saturating_sub(policy.reserve_tokens);
        let built = |(prompt, prompt_tokens): (String, usize), keep: usize| Built {
            prompt,
            prompt_tokens,
            turns_used: keep,
            turns_dropped: units - keep,
        };
        let all = self.render(policy, c, units)?;
        if all.1 <= budget {
            return Ok(built(all, units));
        }
        let bare = self.render(policy, c, 0)?;
        if bare.1 > budget {
            if bare.1 > self.context_length {
                return Err(PromptError::TooLong { tokens: bare.1, context_length: self.context_length });
            }
            return Ok(built(bare, 0));
        }
        // The most units that fit: fits(0) holds and fits(len) does not; the prompt only grows
        // with each unit kept, so bisect.
        let (mut fits, mut over) = ((bare, 0usize), units);
        while over - fits.1 > 1 {
            let mid = fits.1 + (over - fits.1) / 2;
            let rendered = self.render(policy, c, mid)?;
            if rendered.1 <= budget {
                fits = (rendered, mid);
            } else {
                over = mid;
            }
        }
        Ok(built(fits.0, fits.1))
    }
}

/// Every generation model of the manifest that has a chat template and a tokenizer.
pub struct PromptModels {
    models: BTreeMap<String, PromptModel>,
}

impl PromptModels {
    /// Loads `<dir>/manifest.json` and each generation model's template and tokenizer (a model
    /// lacking either is skipped with a warning; none at all is an error).
    pub fn load(dir: &Path) -> Result<Self, PromptError> {
        let manifest = Manifest::load(dir).map_err(|e| PromptError::Models(e.to_string()))?;
        let mut models = BTreeMap::new();
        for entry in manifest.models_of(ModelKind::Generate) {
            let loaded =
                manifest.chat_template(&entry.name).and_then(|t| Ok((t, manifest.model_tokenizer(&entry.name)?)));
            match loaded {
                Ok((template, mut tokenizer)) => {
                    // Counting must see every token: no truncation or padding from tokenizer.json.
                    tokenizer.with_truncation(None).map_err(|e| PromptError::Tokenizer(e.to_string()))?;
                    tokenizer.with_padding(None);
                    models.insert(entry.name.clone(), PromptModel::new(template, tokenizer, entry.context_length));
                }
                Err(e) => warn!(model = entry.name, error = %e, "model skipped: no prompts can be built for it"),
            }
        }
        if models.is_empty() {
            return Err(PromptError::Models(format!(
                "no generation model with a chat template and tokenizer in {}",
                dir.display()
            )));
        }
        Ok(Self { models })
    }

    pub fn get(&self, model: &str) -> Option<&PromptModel> {
        self.models.get(model)
    }

    pub fn names(&self) -> Vec<&str> {
        self.models.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                          {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    /// One token per whitespace-separated word, each template marker line counting as one.
    struct Words;

    impl TokenCount for Words {
        fn count(&self, text: &str) -> Result<usize, PromptError> {
            Ok(text.split_whitespace().count())
        }
    }

    fn model(context_length: usize) -> PromptModel<Words> {
        PromptModel::new(ChatTemplate::new(CHATML).unwrap(), Words, context_length)
    }

    fn history(n: usize, words: usize) -> Vec<(String, String)> {
        (0..n).map(|i| (format!("q{i} {}", "w ".repeat(words)), format!("a{i} {}", "w ".repeat(words)))).collect()
    }

    fn policy(reserve_tokens: usize) -> PromptPolicy {
        PromptPolicy { system_prompt: Some("Be brief.".into()), reserve_tokens }
    }

    #[test]
    fn everything_fits_under_a_large_budget() {
        let h = history(3, 2);
        let b = model(1000).build(&policy(0), &Conversation::of(&h, [], "hello")).unwrap();
        assert_eq!((b.turns_used, b.turns_dropped), (3, 0));
        assert!(b.prompt.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq0 "));
        assert!(b.prompt.ends_with("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"));
        assert_eq!(b.prompt_tokens, Words.count(&b.prompt).unwrap());
    }

    #[test]
    fn the_oldest_pairs_are_dropped_first_until_it_fits() {
        let h = history(6, 10);
        let m = model(100);
        let full = m.build(&policy(0), &Conversation::of(&h, [], "hello")).unwrap();
        assert!(full.prompt_tokens > 60, "{}", full.prompt_tokens);
        for reserve in [10, 30, 45, 60, 70] {
            let b = m.build(&policy(reserve), &Conversation::of(&h, [], "hello")).unwrap();
            assert!(b.prompt_tokens <= 100 - reserve, "reserve {reserve}: {} tokens", b.prompt_tokens);
            assert_eq!(b.turns_used + b.turns_dropped, 6);
            // Exactly the newest `turns_used` pairs, whole, in order.
            let kept: Vec<usize> = (0..6).filter(|i| b.prompt.contains(&format!("q{i} "))).collect();
            assert_eq!(kept, (6 - b.turns_used..6).collect::<Vec<_>>(), "reserve {reserve}");
            for i in &kept {
                assert!(b.prompt.contains(&format!("a{i} ")));
            }
            // And it is the most that fit: one more pair would be over.
            if b.turns_dropped > 0 {
                let one_more =
                    m.render(&policy(reserve), &Conversation::of(&h, [], "hello"), b.turns_used + 1).unwrap();
                assert!(one_more.1 > 100 - reserve);
            }
        }
    }

    #[test]
    fn without_room_for_history_the_prompt_goes_bare_unless_past_the_window() {
        let h = history(2, 10);
        let m = model(30);
        let b = m.build(&policy(25), &Conversation::of(&h, [], "hello there")).unwrap();
        assert_eq!((b.turns_used, b.turns_dropped), (0, 2));
        assert!(b.prompt_tokens > 5 && b.prompt_tokens <= 30);
        let long = "w ".repeat(40);
        assert!(matches!(
            m.build(&policy(0), &Conversation::of(&h, [], &long)),
            Err(PromptError::TooLong { context_length: 30, .. })
        ));
    }

    #[test]
    fn no_system_message_when_none_is_configured() {
        let p = PromptPolicy { system_prompt: None, reserve_tokens: 0 };
        let b = model(100).build(&p, &Conversation::of(&[], [], "hi")).unwrap();
        assert_eq!(b.prompt, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(b.turns_used, 0);
    }

    /// The real model: its template, tokenizer and context length from the prepared manifest.
    #[test]
    fn the_prepared_models_render_chatml_and_count_with_their_tokenizer() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/prepared");
        if !dir.join("manifest.json").exists() {
            let test = "the_prepared_models_render_chatml_and_count_with_their_tokenizer";
            millrace_testkit::skip_or_fail(test, "no prepared models (run scripts/prepare-models.sh)");
            return;
        }
        let models = PromptModels::load(&dir).unwrap();
        let m = models.get("smollm2-135m").unwrap();
        let h = vec![("What is the capital of France?".to_owned(), "Paris.".to_owned())];
        let p = PromptPolicy {
            system_prompt: Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()),
            reserve_tokens: 512,
        };
        let b = m.build(&p, &Conversation::of(&h, [], "And of Italy?")).unwrap();
        assert_eq!(b.turns_used, 1);
        assert_eq!(
            b.prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n\
             <|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"
        );
        // Special tokens count as one each: far fewer tokens than characters.
        assert!(b.prompt_tokens > 20 && b.prompt_tokens < 80, "{}", b.prompt_tokens);
        // A budget of 40 tokens cannot hold the exchange.
        let tight = PromptPolicy { reserve_tokens: m.context_length() - 40, ..p };
        let b = m.build(&tight, &Conversation::of(&h, [], "And of Italy?")).unwrap();
        assert_eq!((b.turns_used, b.turns_dropped), (0, 1));
        assert!(b.prompt_tokens <= 40);
    }
}
