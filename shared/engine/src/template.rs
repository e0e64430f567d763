//! Chat templates from the model manifest, rendered with minijinja (the templates are Jinja,
//! as HuggingFace ships them).
use minijinja::{Environment, context};
use serde::Serialize;

use crate::EngineError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_owned(), content: content.to_owned() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.add_template_owned("chat", source.to_owned()).map_err(|e| EngineError::Template(e.to_string()))?;
        Ok(Self { env })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, EngineError> {
        self.env
            .get_template("chat")
            .and_then(|t| t.render(context! { messages => messages, add_generation_prompt => add_generation_prompt }))
            .map_err(|e| EngineError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                          {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn chatml_renders_turns_and_the_generation_prompt() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let prompt =
            t.render(&[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_broken_template_is_a_clear_error() {
        assert!(matches!(ChatTemplate::new("{% for %}"), Err(EngineError::Template(_))));
    }
}
