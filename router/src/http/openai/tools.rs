//! Tool calling on `/v1/chat/completions`.
//!
//! The model calls tools by answering with a JSON list of calls,
//! `[{"name": "<function>", "arguments": {...}}, ...]`, which a grammar enforces:
//! - `required` and a named function: the answer is such a list from its first token
//!   (one call unless `parallel_tool_calls`; only the named function when named);
//! - `auto`: the answer is either such a list or free text that does not start with
//!   `[` (a Lark grammar of the two branches): the model chooses with its first
//!   character, and a call, once started, follows the tools' schemas. (TGI instead
//!   always answers JSON, with a `no_tool` pseudo-function carrying text; vLLM leaves
//!   `auto` unconstrained and parses the model's own syntax.)
//!
//! The answer's calls become OpenAI's `tool_calls` (arguments as a JSON string), both
//! whole and streamed, by one scanner of the list ([`CallStream`]).

use crate::api::generate::GrammarParameter;
use crate::api::openai::{
    ChatCompletionRequest, FunctionCall, FunctionCallDelta, Tool, ToolCall, ToolCallDelta, ToolChoice, ToolChoiceMode,
    ToolType,
};
use crate::validation::chat_template::PromptTools;
use crate::validation::ValidationError;
use serde_json::{json, Value};

/// What the model is told when its chat template does not take `tools` (TGI's
/// `tool_prompt` replaces the first sentence).
const DEFAULT_TOOL_PROMPT: &str = "You can call the following functions.";

/// How a request may call its tools.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    tools: Vec<Tool>,
    choice: Choice,
    parallel: bool,
    tool_prompt: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Choice {
    Auto,
    Required,
    Named(String),
}

fn invalid(message: String) -> ValidationError {
    ValidationError::Tools(message)
}

impl ToolUse {
    /// The request's tool use, checked; None when it calls no tools (no tools, or
    /// `tool_choice: "none"`).
    pub fn from_request(request: &ChatCompletionRequest) -> Result<Option<Self>, ValidationError> {
        let tools = request.tools.clone().unwrap_or_default();
        let choice = match (&request.tool_choice, tools.is_empty()) {
            (Some(ToolChoice::Mode(ToolChoiceMode::None)), _) | (None, true) => return Ok(None),
            (Some(_), true) => return Err(invalid("`tool_choice` needs `tools`".into())),
            (None | Some(ToolChoice::Mode(ToolChoiceMode::Auto)), false) => Choice::Auto,
            (Some(ToolChoice::Mode(ToolChoiceMode::Required)), false) => Choice::Required,
            (Some(ToolChoice::Named(named)), false) => Choice::Named(named.function.name.clone()),
        };
        for (i, tool) in tools.iter().enumerate() {
            let name = &tool.function.name;
            if name.is_empty() {
                return Err(invalid(format!("`tools[{i}].function.name` is empty")));
            }
            if tools[..i].iter().any(|other| &other.function.name == name) {
                return Err(invalid(format!("two tools are named `{name}`")));
            }
            match &tool.function.parameters {
                None => {}
                Some(Value::Object(schema)) if schema.get("type").is_none_or(|t| t == "object") => {}
                Some(_) => {
                    return Err(invalid(format!("`tools[{i}].function.parameters` must be the JSON schema of an object")))
                }
            }
        }
        if let Choice::Named(name) = &choice {
            if !tools.iter().any(|tool| &tool.function.name == name) {
                return Err(invalid(format!("`tool_choice` names `{name}`, which is not one of `tools`")));
            }
        }
        if request.response_format.as_ref().and_then(|f| f.grammar()).is_some() {
            return Err(invalid("`response_format` cannot be combined with `tools`".into()));
        }
        let tool_prompt = request.tool_prompt.clone().filter(|p| !p.is_empty());
        Ok(Some(Self {
            tools,
            choice,
            parallel: request.parallel_tool_calls.unwrap_or(true),
            tool_prompt: tool_prompt.unwrap_or_else(|| DEFAULT_TOOL_PROMPT.into()),
        }))
    }

    /// Whether the answer may be text instead of calls.
    pub fn allows_text(&self) -> bool {
        self.choice == Choice::Auto
    }

    /// The grammar the answer follows.
    pub fn grammar(&self) -> GrammarParameter {
        let calls = self.calls_schema();
        match self.choice {
            Choice::Auto => GrammarParameter::Lark(format!(
                "start: TEXT | calls\ncalls: %json {}\nTEXT: /[^\\[\\s](?s:.*)/\n",
                grammar::with_json_layout(calls)
            )),
            Choice::Required | Choice::Named(_) => GrammarParameter::Json(calls),
        }
    }

    /// A JSON list of calls of the callable tools.
    fn calls_schema(&self) -> Value {
        let callable: Vec<Value> = self
            .tools
            .iter()
            .filter(|tool| match &self.choice {
                Choice::Named(name) => &tool.function.name == name,
                Choice::Auto | Choice::Required => true,
            })
            .map(|tool| {
                let arguments =
                    tool.function.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                json!({
                    "type": "object",
                    "properties": {"name": {"const": tool.function.name}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": false
                })
            })
            .collect();
        let call = match <[Value; 1]>::try_from(callable) {
            Ok([one]) => one,
            Err(many) => json!({"anyOf": many}),
        };
        let mut calls = json!({"type": "array", "items": call, "minItems": 1});
        if !self.parallel || matches!(self.choice, Choice::Named(_)) {
            calls["maxItems"] = json!(1);
        }
        calls
    }

    /// The tools as the chat template gets them.
    pub fn prompt_tools(&self) -> PromptTools {
        let listed: Vec<String> = self.tools.iter().map(|tool| json!(tool.function).to_string()).collect();
        let fallback_prompt = format!(
            "{}\n{}\nTo call functions, answer with only a JSON list of calls: \
             [{{\"name\": <function name>, \"arguments\": <its arguments as a JSON object>}}].",
            self.tool_prompt,
            listed.join("\n")
        );
        PromptTools { tools: self.tools.clone(), fallback_prompt }
    }
}

/// The calls of a whole answer, if it is a list of calls.
pub fn parse_calls(text: &str) -> Option<Vec<ToolCall>> {
    serde_json::from_str::<Vec<Value>>(text).ok()?;
    let mut calls: Vec<ToolCall> = Vec::new();
    for delta in CallStream::default().push(text) {
        match (delta.id, delta.function.name) {
            (Some(id), Some(name)) => calls.push(ToolCall {
                id,
                kind: ToolType::Function,
                function: FunctionCall { name, arguments: delta.function.arguments },
            }),
            _ => calls.last_mut()?.function.arguments.push_str(&delta.function.arguments),
        }
    }
    (!calls.is_empty()).then_some(calls)
}

fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

/// Reads a JSON list of calls as it is generated and yields OpenAI's deltas: for each
/// call, once its name is known, one with its index, id, type and name, then the text
/// of its `arguments` object in pieces as it comes. A JSON scanner over structure only:
/// the grammar guarantees the text is (a prefix of) such a list.
#[derive(Debug, Default)]
pub struct CallStream {
    /// Open `[` and `{`: 1 in the list, 2 in a call, 3 and more in its arguments.
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// In a call: a key comes next.
    expect_key: bool,
    reading_key: bool,
    /// The call's last key, raw.
    key: String,
    reading_name: bool,
    /// The call's name, raw (JSON-escaped), and whether it is complete.
    name: String,
    named: bool,
    in_arguments: bool,
    /// Argument text not sent yet.
    arguments: String,
    /// The current call's index, and whether its first delta was sent.
    index: u32,
    started: bool,
}

impl CallStream {
    /// The deltas `text`, the next piece of the answer, completes.
    pub fn push(&mut self, text: &str) -> Vec<ToolCallDelta> {
        let mut deltas = Vec::new();
        for c in text.chars() {
            if self.in_arguments {
                self.arguments.push(c);
            }
            if self.in_string {
                self.string_char(c);
                continue;
            }
            match c {
                '"' => {
                    self.in_string = true;
                    if self.depth == 2 && self.expect_key {
                        (self.reading_key, self.expect_key) = (true, false);
                        self.key.clear();
                    } else if self.depth == 2 && self.key == "name" {
                        self.reading_name = true;
                    }
                }
                '{' | '[' => {
                    self.depth += 1;
                    if self.depth == 2 {
                        self.expect_key = true;
                        self.key.clear();
                        self.name.clear();
                        (self.named, self.started) = (false, false);
                    } else if self.depth == 3 && self.key == "arguments" {
                        self.in_arguments = true;
                        self.arguments.push(c);
                    }
                }
                '}' | ']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 2 {
                        self.in_arguments = false;
                    } else if self.depth == 1 {
                        self.flush(&mut deltas);
                        self.index += 1;
                    }
                }
                ',' if self.depth == 2 => self.expect_key = true,
                _ => {}
            }
        }
        self.flush(&mut deltas);
        deltas
    }

    fn string_char(&mut self, c: char) {
        let ends = !self.escaped && c == '"';
        self.escaped = !self.escaped && c == '\\';
        if ends {
            self.in_string = false;
            self.reading_key = false;
            if self.reading_name {
                (self.reading_name, self.named) = (false, true);
            }
        } else if self.reading_key {
            self.key.push(c);
        } else if self.reading_name {
            self.name.push(c);
        }
    }

    /// Sends what the current call has ready: its first delta once named, then its
    /// arguments so far.
    fn flush(&mut self, deltas: &mut Vec<ToolCallDelta>) {
        if !self.named {
            return;
        }
        if !self.started {
            self.started = true;
            let name = serde_json::from_str(&format!("\"{}\"", self.name)).unwrap_or_else(|_| self.name.clone());
            deltas.push(ToolCallDelta {
                index: self.index,
                id: Some(call_id()),
                kind: Some(ToolType::Function),
                function: FunctionCallDelta { name: Some(name), arguments: String::new() },
            });
        }
        if !self.arguments.is_empty() {
            deltas.push(ToolCallDelta {
                index: self.index,
                id: None,
                kind: None,
                function: FunctionCallDelta { name: None, arguments: std::mem::take(&mut self.arguments) },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ChatCompletionRequest {
        let mut body = body;
        body["messages"] = json!([{"role": "user", "content": "hi"}]);
        serde_json::from_value(body).unwrap()
    }

    fn weather_tools() -> Value {
        json!([
            {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}
        ])
    }

    #[test]
    fn tool_choice_is_checked_against_the_tools() {
        let error = |body| ToolUse::from_request(&request(body)).unwrap_err().to_string();
        assert!(error(json!({"tool_choice": "required"})).contains("`tool_choice` needs `tools`"));
        let named = json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}});
        assert!(error(named).contains("`tool_choice` names `nope`, which is not one of `tools`"));
        let twice = json!({"tools": [weather_tools()[1], weather_tools()[1]]});
        assert!(error(twice).contains("two tools are named `get_time`"));
        let not_object = json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]});
        assert!(error(not_object).contains("must be the JSON schema of an object"));
        let with_format = json!({"tools": weather_tools(), "response_format": {"type": "json_object"}});
        assert!(error(with_format).contains("`response_format` cannot be combined with `tools`"));
        assert_eq!(ToolUse::from_request(&request(json!({}))).unwrap(), None);
        assert_eq!(ToolUse::from_request(&request(json!({"tools": weather_tools(), "tool_choice": "none"}))).unwrap(), None);
        let auto = ToolUse::from_request(&request(json!({"tools": weather_tools()}))).unwrap().unwrap();
        assert!(auto.allows_text());
    }

    #[test]
    fn required_and_named_choices_constrain_to_lists_of_calls() {
        let required = ToolUse::from_request(&request(json!({"tools": weather_tools(), "tool_choice": "required"})));
        let GrammarParameter::Json(schema) = required.unwrap().unwrap().grammar() else { panic!("a JSON schema") };
        assert_eq!(schema["items"]["anyOf"].as_array().unwrap().len(), 2);
        assert_eq!(schema["items"]["anyOf"][1]["properties"]["arguments"], json!({"type": "object", "properties": {}}));
        assert_eq!(schema.get("maxItems"), None);
        let named = json!({"tools": weather_tools(), "parallel_tool_calls": true,
                           "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
        let GrammarParameter::Json(schema) = ToolUse::from_request(&request(named)).unwrap().unwrap().grammar() else {
            panic!("a JSON schema")
        };
        assert_eq!(schema["items"]["properties"]["name"], json!({"const": "get_weather"}));
        assert_eq!(schema["maxItems"], 1);
        let auto = ToolUse::from_request(&request(json!({"tools": weather_tools(), "parallel_tool_calls": false})));
        let GrammarParameter::Lark(lark) = auto.unwrap().unwrap().grammar() else { panic!("a Lark grammar") };
        assert!(lark.starts_with("start: TEXT | calls\ncalls: %json {"), "{lark}");
        assert!(lark.contains(r#""maxItems":1"#), "{lark}");
    }

    #[test]
    fn streamed_calls_reassemble_to_the_whole_answers_calls() {
        let text = r#"[{"name": "get_weather", "arguments": {"city": "Paris \"15e\"", "n": [1, {"a": 2}]}},
                       {"name":"get_time","arguments":{}}]"#;
        let whole = parse_calls(text).unwrap();
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].function.name, "get_weather");
        assert_eq!(whole[0].function.arguments, r#"{"city": "Paris \"15e\"", "n": [1, {"a": 2}]}"#);
        assert_eq!(whole[1].function, FunctionCall { name: "get_time".into(), arguments: "{}".into() });
        assert!(whole[0].id.starts_with("call_") && whole[0].id != whole[1].id);
        // Token by token (a few characters each), the same calls come out.
        let mut stream = CallStream::default();
        let chars: Vec<char> = text.chars().collect();
        let deltas: Vec<ToolCallDelta> = chars.chunks(3).flat_map(|piece| stream.push(&piece.iter().collect::<String>())).collect();
        let mut calls: Vec<(u32, String, String)> = Vec::new();
        for delta in &deltas {
            match &delta.function.name {
                Some(name) => {
                    assert!(delta.id.is_some() && delta.kind == Some(ToolType::Function));
                    assert_eq!(delta.function.arguments, "");
                    calls.push((delta.index, name.clone(), String::new()));
                }
                None => {
                    let call = calls.last_mut().unwrap();
                    assert_eq!(call.0, delta.index);
                    call.2.push_str(&delta.function.arguments);
                }
            }
        }
        let expected: Vec<(u32, String, String)> =
            (0..).zip(whole).map(|(i, call)| (i, call.function.name, call.function.arguments)).collect();
        assert_eq!(calls, expected);
        assert!(deltas.iter().filter(|d| d.index == 0).count() > 3, "the arguments come in pieces");
    }

    #[test]
    fn text_is_not_calls() {
        assert_eq!(parse_calls("The weather is fine."), None);
        assert_eq!(parse_calls("[]"), None);
        assert_eq!(parse_calls(r#"[{"name": "f", "arguments": {"#), None);
    }
}
