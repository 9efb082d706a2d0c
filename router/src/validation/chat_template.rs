//! Renders a conversation into a prompt with the model's Jinja chat template,
//! the way transformers' `apply_chat_template` does (trim_blocks, lstrip_blocks,
//! `raise_exception`, python string methods).

use super::ValidationError;
use crate::api::openai::{Message, Role, Tool, ToolCall};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use serde_json::{json, Value};

const TEMPLATE_NAME: &str = "chat";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The template renders `tools` itself (Llama 3.1, Qwen 2.5, Mistral, Hermes ...).
    takes_tools: bool,
}

/// The tools of a request, for the prompt.
pub struct PromptTools {
    pub tools: Vec<Tool>,
    /// For templates that do not take `tools`: a system prompt that lists them and says
    /// how to call them.
    pub fallback_prompt: String,
}

#[derive(Serialize)]
struct TemplateMessage {
    role: Role,
    /// Empty in an assistant message that only calls tools.
    content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
}

#[derive(Serialize)]
struct TemplateContext<'a> {
    messages: Vec<TemplateMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a [Tool]>,
    bos_token: Option<&'a str>,
    eos_token: Option<&'a str>,
    add_generation_prompt: bool,
}

fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// A call's arguments as templates read them: the JSON value (templates write it
/// with `tojson`), or the string when it is not JSON.
fn template_tool_call(call: &ToolCall) -> Value {
    let arguments = serde_json::from_str(&call.function.arguments).unwrap_or(json!(call.function.arguments));
    json!({"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}})
}

/// Calls written as the model is asked to write them when its template has no tools.
fn calls_as_text(calls: &[ToolCall]) -> String {
    let calls: Vec<Value> = calls
        .iter()
        .map(|call| {
            let arguments = template_tool_call(call)["function"]["arguments"].take();
            json!({"name": call.function.name, "arguments": arguments})
        })
        .collect();
    Value::Array(calls).to_string()
}

impl ChatTemplate {
    /// Fails when the template does not parse.
    pub fn new(source: String, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, minijinja::Error> {
        let takes_tools = source.contains("tools");
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source)?;
        Ok(Self { env, bos_token, eos_token, takes_tools })
    }

    /// The prompt for the assistant's next message, with the `tools` it may call.
    pub fn apply(&self, messages: Vec<Message>, tools: Option<&PromptTools>) -> Result<String, ValidationError> {
        if messages.is_empty() {
            return Err(ValidationError::OutOfRange { name: "messages", expected: "a non-empty list" });
        }
        let mut rendered = Vec::with_capacity(messages.len() + 1);
        for (i, message) in messages.into_iter().enumerate() {
            rendered.push(self.template_message(i, message)?);
        }
        let template_tools = match tools {
            Some(tools) if self.takes_tools => Some(tools.tools.as_slice()),
            Some(tools) => {
                match rendered.first_mut() {
                    Some(first) if first.role == Role::System => {
                        first.content = format!("{}\n\n{}", first.content, tools.fallback_prompt)
                    }
                    _ => rendered.insert(0, TemplateMessage::text(Role::System, tools.fallback_prompt.clone())),
                }
                None
            }
            None => None,
        };
        let context = TemplateContext {
            messages: rendered,
            tools: template_tools,
            bos_token: self.bos_token.as_deref(),
            eos_token: self.eos_token.as_deref(),
            add_generation_prompt: true,
        };
        self.env
            .get_template(TEMPLATE_NAME)
            .and_then(|template| template.render(context))
            .map_err(|e| ValidationError::ChatTemplate(describe(&e)))
    }

    /// Message `i` as the template reads it; an assistant's calls are structured for
    /// templates that take tools, and written as text for the others.
    fn template_message(&self, i: usize, message: Message) -> Result<TemplateMessage, ValidationError> {
        let calls = message.tool_calls.filter(|calls| !calls.is_empty());
        if calls.is_some() && message.role != Role::Assistant {
            return Err(ValidationError::Tools(format!("`messages[{i}].tool_calls` is only for assistant messages")));
        }
        if message.tool_call_id.is_some() && message.role != Role::Tool {
            return Err(ValidationError::Tools(format!("`messages[{i}].tool_call_id` is only for tool messages")));
        }
        let content = match (message.content, &calls) {
            (Some(content), _) => content.into_text(),
            (None, Some(_)) => String::new(),
            (None, None) => {
                return Err(ValidationError::OutOfRange {
                    name: "content",
                    expected: "set, except in assistant messages with `tool_calls`",
                })
            }
        };
        let (content, tool_calls) = match calls {
            Some(calls) if self.takes_tools => (content, Some(calls.iter().map(template_tool_call).collect())),
            Some(calls) if content.is_empty() => (calls_as_text(&calls), None),
            Some(calls) => (format!("{content}\n{}", calls_as_text(&calls)), None),
            None => (content, None),
        };
        Ok(TemplateMessage { role: message.role, content, name: message.name, tool_calls, tool_call_id: message.tool_call_id })
    }
}

impl TemplateMessage {
    fn text(role: Role, content: String) -> Self {
        Self { role, content, name: None, tool_calls: None, tool_call_id: None }
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
        Message { role, content: Some(MessageContent::Text(content.into())), name: None, tool_calls: None, tool_call_id: None }
    }

    fn smollm2_template() -> ChatTemplate {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct");
        let files = ModelFiles::open(path).expect("the default model (scripts/fetch-default-model.sh)");
        let special = files.special_tokens().unwrap();
        ChatTemplate::new(files.chat_template().unwrap().unwrap(), special.bos_token, special.eos_token).unwrap()
    }

    #[test]
    fn renders_smollm2_chatml_with_default_system_prompt() {
        let prompt = smollm2_template().apply(vec![message(Role::User, "What is the capital of France?")], None).unwrap();
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
            ], None)
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
        assert_eq!(template.apply(vec![message(Role::User, "  hi  ")], None).unwrap(), "<s>[USER] hi</s>");
        assert_eq!(
            template.apply(vec![message(Role::System, "x")], None).unwrap_err(),
            ValidationError::ChatTemplate("System role not supported".into())
        );
        assert!(matches!(template.apply(vec![], None), Err(ValidationError::OutOfRange { name: "messages", .. })));
    }

    fn prompt_tools() -> PromptTools {
        let tool: Tool = serde_json::from_value(json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}))
        .unwrap();
        PromptTools { tools: vec![tool], fallback_prompt: "Call get_weather.".into() }
    }

    fn history() -> Vec<Message> {
        let call = ToolCall {
            id: "call_1".into(),
            kind: crate::api::openai::ToolType::Function,
            function: crate::api::openai::FunctionCall { name: "get_weather".into(), arguments: r#"{"city": "Paris"}"#.into() },
        };
        let mut calling = message(Role::Assistant, "");
        (calling.content, calling.tool_calls) = (None, Some(vec![call]));
        let mut result = message(Role::Tool, "sunny");
        result.tool_call_id = Some("call_1".into());
        vec![message(Role::User, "Weather?"), calling, result]
    }

    #[test]
    fn templates_that_take_tools_get_them_and_the_calls_structured() {
        let source = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}\
                      {% for m in messages %}{{ m.role }}:{% if m.tool_calls %}\
                      {% for c in m.tool_calls %}{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}\
                      {% else %}{{ m.content }}{% endif %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %};{% endfor %}";
        let template = ChatTemplate::new(source.into(), None, None).unwrap();
        assert_eq!(
            template.apply(history(), Some(&prompt_tools())).unwrap(),
            r#"[get_weather]user:Weather?;assistant:get_weather{"city":"Paris"};tool:sunny(call_1);"#
        );
    }

    #[test]
    fn other_templates_get_the_tools_in_the_system_prompt_and_the_calls_as_text() {
        let prompt = smollm2_template().apply(history(), Some(&prompt_tools())).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nCall get_weather.<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n\
             <|im_start|>assistant\n[{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}]<|im_end|>\n\
             <|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n"
        );
        // A system message of the request's own comes first.
        let mut messages = history();
        messages.insert(0, message(Role::System, "Be brief."));
        let prompt = smollm2_template().apply(messages, Some(&prompt_tools())).unwrap();
        assert!(prompt.starts_with("<|im_start|>system\nBe brief.\n\nCall get_weather.<|im_end|>"), "{prompt}");
    }

    #[test]
    fn tool_fields_only_where_they_belong() {
        let mut misplaced = history();
        misplaced[2].role = Role::User;
        assert!(smollm2_template().apply(misplaced, None).unwrap_err().to_string().contains("tool_call_id"));
        let mut empty = history();
        empty[0].content = None;
        assert!(matches!(smollm2_template().apply(empty, None), Err(ValidationError::OutOfRange { name: "content", .. })));
    }

    #[test]
    fn rejects_unparsable_templates() {
        assert!(ChatTemplate::new("{% for %}".into(), None, None).is_err());
    }
}
