//! OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

use super::generate::GrammarParameter;
use super::neutral_only::NeutralOnly;
use crate::http::openai::OpenAiSampling;
use crate::infer_types::Token;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// A string or a list of strings.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage (and no choices) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result, answering the assistant's call `tool_call_id`.
    Tool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ContentPart {
    Text { text: String },
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text parts joined, as the chat template sees them.
    pub fn into_text(self) -> String {
        match self {
            MessageContent::Text(text) => text,
            MessageContent::Parts(parts) => parts.into_iter().map(|ContentPart::Text { text }| text).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    /// `null` only in an assistant message with `tool_calls`.
    #[serde(default)]
    #[schema(nullable)]
    pub content: Option<MessageContent>,
    #[serde(default)]
    #[schema(nullable)]
    pub name: Option<String>,
    /// The calls an assistant message made.
    #[serde(default)]
    #[schema(nullable)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// In a `tool` message: the call it answers.
    #[serde(default)]
    #[schema(nullable)]
    pub tool_call_id: Option<String>,
}

/// The only kind of tool: a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ToolType {
    Function,
}

/// A call of a function, as the assistant's messages carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: ToolType,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON object, in a string.
    pub arguments: String,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: ToolType,
    pub function: FunctionDefinition,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable)]
    pub description: Option<String>,
    /// The JSON schema of the arguments (an object); unset: no arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, nullable)]
    pub parameters: Option<serde_json::Value>,
    /// Accepted either way: calls always follow `parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable)]
    pub strict: Option<bool>,
}

/// `none`, `auto`, `required`, or `{"type": "function", "function": {"name": ...}}`.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(ToolChoiceMode),
    Named(NamedToolChoice),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    /// Answer in text (the tools are not shown to the model).
    None,
    /// Answer in text or call tools, as the model decides.
    Auto,
    /// Call one or more tools.
    Required,
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: ToolType,
    pub function: FunctionName,
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionName {
    pub name: String,
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    JsonSchema {
        #[serde(deserialize_with = "super::object")]
        json_schema: JsonSchemaFormat,
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default)]
    #[schema(nullable)]
    pub description: Option<String>,
    /// The JSON schema the output follows; unset: any JSON object.
    #[serde(default)]
    #[schema(value_type = Option<Object>, nullable)]
    pub schema: Option<serde_json::Value>,
    /// Accepted either way: the output always follows the schema.
    #[serde(default)]
    #[schema(nullable)]
    pub strict: Option<bool>,
}

impl ResponseFormat {
    /// The grammar that produces this format (none for text).
    pub fn grammar(&self) -> Option<GrammarParameter> {
        let any_object = || serde_json::json!({"type": "object"});
        match self {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(GrammarParameter::Json(any_object())),
            ResponseFormat::JsonSchema { json_schema } => {
                Some(GrammarParameter::Json(json_schema.schema.clone().unwrap_or_else(any_object)))
            }
        }
    }
}

/// Declares an OpenAI request body: its own fields, then those that chat and
/// completion requests share, and `sampling` to read the shared ones. A macro
/// rather than a `#[serde(flatten)]` struct: flatten would drop the field's name
/// and position from deserialization errors and make the OpenAPI schema an `allOf`.
macro_rules! openai_request {
    ($(#[$attr:meta])* pub struct $name:ident { $($own_fields:tt)* }) => {
        $(#[$attr])*
        pub struct $name {
            $($own_fields)*
            /// 0 means greedy decoding; unset means the model's default (its
            /// generation_config.json, as `/info` reports it), else 1 (sampling).
            #[serde(default)]
            #[schema(nullable, minimum = 0.0)]
            pub temperature: Option<f32>,
            #[serde(default)]
            #[schema(nullable, exclusive_minimum = 0.0, maximum = 1.0)]
            pub top_p: Option<f32>,
            /// Keep the `top_k` most likely tokens; -1 or 0 disables it (vLLM's extension).
            #[serde(default)]
            #[schema(nullable, minimum = -1, example = 50)]
            pub top_k: Option<i32>,
            /// In [0, 1]: drop the tokens less likely than `min_p` times the most likely one;
            /// 0 disables it (vLLM's extension).
            #[serde(default)]
            #[schema(nullable, minimum = 0.0, maximum = 1.0, example = 0.05)]
            pub min_p: Option<f32>,
            /// Multiplicative penalty of the tokens of the prompt and the output so far; must be
            /// > 0, 1 disables it (vLLM's extension).
            #[serde(default)]
            #[schema(nullable, exclusive_minimum = 0.0, example = 1.1)]
            pub repetition_penalty: Option<f32>,
            #[serde(default)]
            #[schema(nullable, minimum = -2.0, maximum = 2.0)]
            pub frequency_penalty: Option<f32>,
            #[serde(default)]
            #[schema(nullable, minimum = -2.0, maximum = 2.0)]
            pub presence_penalty: Option<f32>,
            /// Only 1 is supported.
            #[serde(default)]
            #[schema(nullable, minimum = 1, maximum = 1)]
            pub n: Option<u32>,
            #[serde(default)]
            #[schema(nullable, minimum = 0)]
            pub seed: Option<u64>,
            #[serde(default)]
            #[schema(nullable)]
            pub stop: Option<OneOrMany>,
            /// Keep generating past the end-of-sequence token (vLLM's extension).
            #[serde(default)]
            pub ignore_eos: bool,
            #[serde(default)]
            pub stream: bool,
            #[serde(default, deserialize_with = "super::optional_object")]
            #[schema(nullable)]
            pub stream_options: Option<StreamOptions>,
            /// Accepted and ignored: the served model answers.
            #[allow(dead_code, reason = "accepted for OpenAI clients, never read")]
            #[serde(default)]
            #[schema(nullable)]
            pub model: Option<String>,
            /// Accepted and ignored.
            #[allow(dead_code, reason = "accepted for OpenAI clients, never read")]
            #[serde(default)]
            #[schema(nullable)]
            pub user: Option<String>,
            /// Not supported: only `null` or `{}`.
            #[serde(default)]
            #[schema(value_type = Option<Object>, nullable)]
            pub logit_bias: Option<serde_json::Value>,
            /// `{"type": "text"}` (as without it), `{"type": "json_object"}` (a JSON object) or
            /// `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`: the
            /// output is constrained to follow it.
            #[serde(default, deserialize_with = "super::optional_object")]
            #[schema(nullable)]
            pub response_format: Option<ResponseFormat>,
        }

        impl $name {
            /// The shared fields that clients send but we do not implement.
            fn shared_neutral_only(&self) -> [NeutralOnly<'_>; 1] {
                [NeutralOnly::empty("logit_bias", &self.logit_bias)]
            }

            /// The shared sampling fields, with the two that each request reads its own way.
            pub fn sampling(&self, max_tokens: Option<u32>, top_n_tokens: Option<u32>) -> OpenAiSampling {
                OpenAiSampling {
                    n: self.n,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    repetition_penalty: self.repetition_penalty,
                    frequency_penalty: self.frequency_penalty,
                    presence_penalty: self.presence_penalty,
                    seed: self.seed,
                    stop: self.stop.clone(),
                    max_tokens,
                    top_n_tokens,
                    ignore_eos: self.ignore_eos,
                    grammar: self.response_format.as_ref().and_then(ResponseFormat::grammar),
                }
            }
        }
    };
}

openai_request! {
    /// Unknown fields are refused (a 422 naming them), never ignored.
    #[derive(Debug, Clone, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct ChatCompletionRequest {
        #[serde(deserialize_with = "super::objects")]
        #[schema(min_items = 1)]
        pub messages: Vec<Message>,
        /// Return the log-probability of each generated token.
        #[serde(default)]
        #[schema(nullable)]
        pub logprobs: Option<bool>,
        /// Alternatives per token, with `logprobs` (at most --max-top-n-tokens).
        #[serde(default)]
        #[schema(nullable, minimum = 0)]
        pub top_logprobs: Option<u32>,
        /// Deprecated by OpenAI in favour of `max_completion_tokens`; unset: the rest of the context.
        #[serde(default)]
        #[schema(nullable, minimum = 1)]
        pub max_tokens: Option<u32>,
        #[serde(default)]
        #[schema(nullable, minimum = 1)]
        pub max_completion_tokens: Option<u32>,
        /// Functions the model may call.
        #[serde(default)]
        #[schema(nullable)]
        pub tools: Option<Vec<Tool>>,
        /// Default: `auto` with tools, `none` without.
        #[serde(default)]
        #[schema(nullable)]
        pub tool_choice: Option<ToolChoice>,
        /// Whether one answer may call several tools (default true).
        #[serde(default)]
        #[schema(nullable)]
        pub parallel_tool_calls: Option<bool>,
        /// TGI's extension: the instructions that introduce the tools, for models whose chat
        /// template does not take them.
        #[serde(default)]
        #[schema(nullable)]
        pub tool_prompt: Option<String>,
    }
}

impl ChatCompletionRequest {
    /// The fields that clients send but we do not implement.
    pub fn neutral_only(&self) -> impl Iterator<Item = NeutralOnly<'_>> {
        self.shared_neutral_only().into_iter()
    }
}

openai_request! {
    /// Unknown fields are refused (a 422 naming them), never ignored.
    #[derive(Debug, Clone, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct CompletionRequest {
        /// One choice is generated per prompt.
        #[schema(schema_with = prompt_schema)]
        pub prompt: OneOrMany,
        /// Unset: the rest of the context.
        #[serde(default)]
        #[schema(nullable, minimum = 1)]
        pub max_tokens: Option<u32>,
        /// Number of alternatives per token to return with the log-probabilities.
        #[serde(default)]
        #[schema(nullable, minimum = 0)]
        pub logprobs: Option<u32>,
        /// Prepend the prompt to the completion.
        #[serde(default)]
        pub echo: bool,
        /// Not supported: only `null` or 1.
        #[serde(default)]
        #[schema(value_type = Option<u32>, nullable)]
        pub best_of: Option<serde_json::Value>,
        /// Not supported: only `null` or `""`.
        #[serde(default)]
        #[schema(value_type = Option<String>, nullable)]
        pub suffix: Option<serde_json::Value>,
    }
}

impl CompletionRequest {
    /// The fields that clients send but we do not implement.
    pub fn neutral_only(&self) -> impl Iterator<Item = NeutralOnly<'_>> {
        let own = [
            NeutralOnly::empty_or("best_of", &self.best_of, serde_json::json!(1)),
            NeutralOnly::empty("suffix", &self.suffix),
        ];
        self.shared_neutral_only().into_iter().chain(own)
    }
}

/// A non-empty string or a non-empty list of them.
fn prompt_schema() -> utoipa::openapi::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
    let text = || ObjectBuilder::new().schema_type(Type::String).min_length(Some(1));
    Schema::OneOf(OneOfBuilder::new().item(text()).item(ArrayBuilder::new().items(text()).min_items(Some(1))).build())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, other: Usage) -> Usage {
        Usage::new(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)
    }
}

/// The fields every OpenAI response and chunk shares; `C` is the kind of choice.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiResponse<C> {
    pub id: String,
    /// `chat.completion`, `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<C>,
    /// In non-streamed responses, and in the last chunk with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `message` of a chat choice.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: Role,
    /// `null` when the message calls tools.
    #[schema(nullable)]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

impl AssistantMessage {
    pub fn new(content: String) -> Self {
        Self { role: Role::Assistant, content: Some(content), tool_calls: None }
    }

    pub fn calling(tool_calls: Vec<ToolCall>) -> Self {
        Self { role: Role::Assistant, content: None, tool_calls: Some(tool_calls) }
    }
}

/// `delta` of a chat chunk: text, or a piece of a tool call.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AssistantDelta {
    pub role: Role,
    #[schema(nullable)]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

impl AssistantDelta {
    pub fn text(content: String) -> Self {
        Self { role: Role::Assistant, content: Some(content), tool_calls: None }
    }

    pub fn tool_call(delta: ToolCallDelta) -> Self {
        Self { role: Role::Assistant, content: None, tool_calls: Some(vec![delta]) }
    }
}

/// A streamed tool call: its first delta has the id, the type and the function's name,
/// the next ones pieces of the arguments, as OpenAI streams them.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ToolCallDelta {
    /// Which call of the message this is part of.
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<ToolType>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// What OpenAI reports for tokens of (practically) zero probability: JSON has no -inf.
const MIN_LOGPROB: f32 = -9999.0;

fn json_logprob(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob.max(MIN_LOGPROB)
    } else {
        MIN_LOGPROB
    }
}

impl From<&Token> for TopLogprob {
    fn from(token: &Token) -> Self {
        Self { token: token.text.clone(), logprob: json_logprob(token.logprob), bytes: token.text.as_bytes().to_vec() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatLogprob>,
}

impl ChatLogprobs {
    /// `tokens` and their alternatives (`top_tokens` may be empty when none were asked for).
    pub fn new(tokens: &[Token], top_tokens: &[Vec<Token>]) -> Self {
        let content = tokens
            .iter()
            .enumerate()
            .map(|(i, token)| {
                let TopLogprob { token, logprob, bytes } = TopLogprob::from(token);
                let top_logprobs = top_tokens.get(i).map(|t| t.iter().map(TopLogprob::from).collect());
                ChatLogprob { token, logprob, bytes, top_logprobs: top_logprobs.unwrap_or_default() }
            })
            .collect();
        Self { content }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    #[schema(nullable)]
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length` or `tool_calls`.
    #[schema(value_type = String, example = "stop")]
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: AssistantDelta,
    #[schema(nullable)]
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length` or `tool_calls`, on the last chunk of the choice.
    #[schema(nullable, value_type = Option<String>, example = "stop")]
    pub finish_reason: Option<&'static str>,
}

/// The legacy completions' log-probabilities, one entry per token.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// `offset`: characters of the choice's text before `tokens[0]`.
    pub fn new(tokens: &[Token], top_tokens: &[Vec<Token>], mut offset: usize) -> Self {
        let mut text_offset = Vec::with_capacity(tokens.len());
        for token in tokens {
            text_offset.push(offset);
            offset += token.text.chars().count();
        }
        Self {
            tokens: tokens.iter().map(|t| t.text.clone()).collect(),
            token_logprobs: tokens.iter().map(|t| json_logprob(t.logprob)).collect(),
            top_logprobs: (0..tokens.len())
                .map(|i| {
                    top_tokens.get(i).map(|top| top.iter().map(|t| (t.text.clone(), json_logprob(t.logprob))).collect())
                })
                .map(Option::unwrap_or_default)
                .collect(),
            text_offset,
        }
    }
}

/// A choice of a completion, or its part in a streamed chunk.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    #[schema(nullable)]
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`: always set when not streaming; on the last chunk of the choice when streaming.
    #[schema(nullable, value_type = Option<String>, example = "length")]
    pub finish_reason: Option<&'static str>,
}

pub type ChatCompletion = OpenAiResponse<ChatChoice>;
pub type ChatCompletionChunk = OpenAiResponse<ChatChunkChoice>;
pub type Completion = OpenAiResponse<CompletionChoice>;

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OpenAiErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub error_type: String,
    #[schema(nullable)]
    pub param: Option<String>,
    #[schema(nullable)]
    pub code: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OpenAiErrorResponse {
    pub error: OpenAiErrorDetail,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_request_accepts_text_parts_and_stop_forms() {
        let request: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "tgi",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
            ],
            "stop": "\n",
            "stream_options": {"include_usage": true}
        }))
        .unwrap();
        assert_eq!(request.messages[1].content.clone().unwrap().into_text(), "Hi there");
        assert_eq!(request.stop.unwrap().into_vec(), vec!["\n".to_string()]);
        assert!(request.stream_options.unwrap().include_usage);
        let many: OneOrMany = serde_json::from_value(json!(["a", "b"])).unwrap();
        assert_eq!(many.into_vec().len(), 2);
    }

    #[test]
    fn chat_request_rejects_unknown_roles_and_parts() {
        let bad_role = json!({"messages": [{"role": "wizard", "content": "x"}]});
        assert!(serde_json::from_value::<ChatCompletionRequest>(bad_role).is_err());
        let image =
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]});
        assert!(serde_json::from_value::<ChatCompletionRequest>(image).is_err());
    }

    #[test]
    fn chunk_shape_matches_openai() {
        let chunk = ChatCompletionChunk {
            id: "chatcmpl-1".into(),
            object: "chat.completion.chunk",
            created: 7,
            model: "m".into(),
            system_fingerprint: "fp".into(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: AssistantDelta::text("Hi".into()),
                logprobs: None,
                finish_reason: Some("stop"),
            }],
            usage: None,
        };
        assert_eq!(
            serde_json::to_value(chunk).unwrap(),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                   "system_fingerprint": "fp",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"},
                                "logprobs": null, "finish_reason": "stop"}]})
        );
    }

    #[test]
    fn logprobs_shapes() {
        let token = |text: &str, logprob| Token { id: 0, text: text.into(), logprob, special: false };
        let tokens = [token("a", -0.5), token("bc", -1.0)];
        let top = [vec![token("a", -0.5), token("x", -2.0), token("z", f32::NEG_INFINITY)]];
        let chat = serde_json::to_value(ChatLogprobs::new(&tokens, &top)).unwrap();
        assert_eq!(chat["content"][0]["top_logprobs"][1], json!({"token": "x", "logprob": -2.0, "bytes": [120]}));
        assert_eq!(chat["content"][1]["top_logprobs"], json!([]));
        let legacy = CompletionLogprobs::new(&tokens, &top, 3);
        assert_eq!(legacy.text_offset, vec![3, 4]);
        assert_eq!(legacy.top_logprobs[0]["x"], -2.0);
        assert_eq!(legacy.top_logprobs[0]["z"], MIN_LOGPROB);
        assert!(legacy.top_logprobs[1].is_empty());
    }

    #[test]
    fn usage_adds_up() {
        assert_eq!(
            Usage::new(3, 4) + Usage::new(1, 1),
            Usage { prompt_tokens: 4, completion_tokens: 5, total_tokens: 9 }
        );
    }
}
