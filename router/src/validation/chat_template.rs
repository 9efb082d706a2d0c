//! Renders a conversation into a prompt with the model's Jinja chat template,
//! the way transformers' `apply_chat_template` does (trim_blocks, lstrip_blocks,
//! `raise_exception`, python string methods).

use super::ValidationError;
use crate::api::openai::{Message, Role};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

const TEMPLATE_NAME: &str = "chat";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

#[derive(Serialize)]
struct TemplateMessage {
    role: Role,
    content: String,
}

#[derive(Serialize)]
struct TemplateContext<'a> {
    messages: Vec<TemplateMessage>,
    bos_token: Option<&'a str>,
    eos_token: Option<&'a str>,
    add_generation_prompt: bool,
}

fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Fails when the template does not parse.
    pub fn new(source: String, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source)?;
        Ok(Self { env, bos_token, eos_token })
    }

    /// The prompt for the assistant's next message.
    pub fn apply(&self, messages: Vec<Message>) -> Result<String, ValidationError> {
        if messages.is_empty() {
            return Err(ValidationError::OutOfRange { name: "messages", expected: "a non-empty list" });
        }
        let messages =
            messages.into_iter().map(|m| TemplateMessage { role: m.role, content: m.content.into_text() }).collect();
        let context = TemplateContext {
            messages,
            bos_token: self.bos_token.as_deref(),
            eos_token: self.eos_token.as_deref(),
            add_generation_prompt: true,
        };
        self.env
            .get_template(TEMPLATE_NAME)
            .and_then(|template| template.render(context))
            .map_err(|e| ValidationError::ChatTemplate(describe(&e)))
    }
}

/// The error and its causes on one line (minijinja nests the `raise_exception` message).
fn describe(error: &minijinja::Error) -> String {
    match error.detail() {
        Some(detail) if error.kind() == ErrorKind::InvalidOperation => detail.to_string(),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::openai::MessageContent;
    use model_store::ModelFiles;

    fn message(role: Role, content: &str) -> Message {
        Message { role, content: MessageContent::Text(content.into()), name: None, tool_calls: None }
    }

    fn smollm2_template() -> ChatTemplate {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct");
        let files = ModelFiles::open(path).expect("the default model (scripts/fetch-default-model.sh)");
        let special = files.special_tokens().unwrap();
        ChatTemplate::new(files.chat_template().unwrap().unwrap(), special.bos_token, special.eos_token).unwrap()
    }

    #[test]
    fn renders_smollm2_chatml_with_default_system_prompt() {
        let prompt = smollm2_template().apply(vec![message(Role::User, "What is the capital of France?")]).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn renders_smollm2_conversation() {
        let prompt = smollm2_template()
            .apply(vec![
                message(Role::System, "Be brief."),
                message(Role::User, "Hi"),
                message(Role::Assistant, "Hello!"),
            ])
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn supports_raise_exception_special_tokens_and_python_methods() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}\
                      {{ raise_exception('System role not supported') }}{% endif %}\
                      [{{ m.role.upper() }}] {{ m.content.strip() }}{{ eos_token }}{% endfor %}";
        let template = ChatTemplate::new(source.into(), Some("<s>".into()), Some("</s>".into())).unwrap();
        assert_eq!(template.apply(vec![message(Role::User, "  hi  ")]).unwrap(), "<s>[USER] hi</s>");
        assert_eq!(
            template.apply(vec![message(Role::System, "x")]).unwrap_err(),
            ValidationError::ChatTemplate("System role not supported".into())
        );
        assert!(matches!(template.apply(vec![]), Err(ValidationError::OutOfRange { name: "messages", .. })));
    }

    #[test]
    fn rejects_unparsable_templates() {
        assert!(ChatTemplate::new("{% for %}".into(), None, None).is_err());
    }
}
