//! `POST /v1/chat/completions`.

use super::{stream_end, ResponseContext};
use super::tools::{parse_calls, CallStream, ToolUse};
use crate::api::openai::{
    AssistantDelta, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatLogprobs, OpenAiResponse, Usage,
};
use crate::api::{neutral_only, Object};
use crate::error::{ApiError, OpenAiError};
use crate::http::metrics::RequestMetrics;
use crate::http::openapi::OpenAiErrors;
use crate::http::server::AppState;
use crate::http::stream::{json_event, sse_response, Generation, Renderer};
use crate::infer_types::{FinishReason, InferStreamResponse};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;

const COMPLETION: &str = "chat.completion";
const CHUNK: &str = "chat.completion.chunk";

/// Chat with the model (OpenAI's Chat Completions API).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "OpenAI", request_body = ChatCompletionRequest,
    responses((status = 200, description = "The assistant's message", content(
        (OpenAiResponse<ChatChoice> = "application/json"), (OpenAiResponse<ChatChunkChoice> = "text/event-stream"))), OpenAiErrors))]
pub async fn chat_completions(
    State(state): State<AppState>,
    payload: Result<Json<Object<ChatCompletionRequest>>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    let metrics = RequestMetrics::new();
    Ok(metrics.observe(respond(&state, payload, metrics).await)?)
}

async fn respond(
    state: &AppState,
    payload: Result<Json<Object<ChatCompletionRequest>>, JsonRejection>,
    metrics: RequestMetrics,
) -> Result<Response, ApiError> {
    let Json(Object(request)) = payload?;
    neutral_only::check(request.neutral_only())?;
    let tool_use = ToolUse::from_request(&request)?;
    let logprobs = request.logprobs.unwrap_or(false);
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let mut sampling = request.sampling(max_tokens, request.top_logprobs.filter(|_| logprobs));
    if let Some(tool_use) = &tool_use {
        sampling.grammar = Some(tool_use.grammar());
    }
    let parameters = sampling.into_parameters(&state.info.generation_defaults)?;
    let template = state.chat_template.as_ref().ok_or(ApiError::NoChatTemplate)?;
    let prompt_tools = tool_use.as_ref().map(ToolUse::prompt_tools);
    let prompt = template.apply(request.messages, prompt_tools.as_ref())?;
    // The template already wrote the special tokens the model expects.
    let valid = state.validation.validate(prompt, &parameters, false).await?;
    metrics.validated(&valid);
    let context = ResponseContext::new(state, "chatcmpl");
    let input_length = valid.input_length();
    let answer = match &tool_use {
        None => Answer::Text,
        Some(tool_use) if tool_use.allows_text() => Answer::Undecided(String::new()),
        Some(_) => Answer::Calls(CallStream::default()),
    };

    if request.stream {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        let usage = include_usage.then(|| Usage::new(input_length, 0));
        let renderer = ChatRenderer { context, logprobs, usage, answer, called: false };
        let (permit, stream) = state.backend.generate_stream(valid)?;
        return Ok(sse_response(vec![Generation { index: 0, permit, stream, metrics }], renderer).into_response());
    }

    let response = state.backend.generate(valid).await?;
    metrics.success(&response.generated_text, response.queued, response.start);
    let generated = &response.generated_text;
    let calls = match answer {
        Answer::Text => None,
        Answer::Undecided(_) | Answer::Calls(_) => parse_calls(&generated.text),
    };
    let finish_reason = finish_reason(generated.finish_reason, calls.is_some());
    let message = match calls {
        Some(calls) => AssistantMessage::calling(calls),
        None => AssistantMessage::new(generated.text.clone()),
    };
    let choice = ChatChoice {
        index: 0,
        message,
        logprobs: logprobs.then(|| ChatLogprobs::new(&response.tokens, &response.top_tokens)),
        finish_reason,
    };
    let usage = Usage::new(input_length, generated.generated_tokens);
    let completion: ChatCompletion = context.response(COMPLETION, vec![choice], Some(usage));
    Ok(Json(completion).into_response())
}

/// OpenAI's finish reason; an answer that called tools and ended by itself says so.
fn finish_reason(reason: FinishReason, called: bool) -> &'static str {
    match reason {
        FinishReason::EosToken | FinishReason::StopSequence if called => "tool_calls",
        reason => reason.as_openai(),
    }
}

/// What the streamed answer is.
enum Answer {
    Text,
    /// Text or calls (`tool_choice: "auto"`): the first character other than white
    /// space tells (`[` starts a list of calls); the white space before it is held.
    Undecided(String),
    Calls(CallStream),
}

/// One chunk per token (several for a token that completes parts of tool calls);
/// special tokens (the end-of-turn token) add no text.
struct ChatRenderer {
    context: ResponseContext,
    logprobs: bool,
    /// Counted only with `stream_options.include_usage`.
    usage: Option<Usage>,
    answer: Answer,
    /// Some tool call was sent.
    called: bool,
}

impl ChatRenderer {
    /// The deltas of the next piece of the answer.
    fn deltas(&mut self, text: String) -> Vec<AssistantDelta> {
        if let Answer::Undecided(held) = &mut self.answer {
            held.push_str(&text);
            let Some(first) = held.chars().find(|c| !c.is_whitespace()) else { return vec![] };
            let held = std::mem::take(held);
            self.answer = if first == '[' { Answer::Calls(CallStream::default()) } else { Answer::Text };
            return self.deltas(held);
        }
        match &mut self.answer {
            Answer::Calls(calls) => {
                let deltas: Vec<AssistantDelta> = calls.push(&text).into_iter().map(AssistantDelta::tool_call).collect();
                self.called |= !deltas.is_empty();
                deltas
            }
            _ if text.is_empty() => vec![],
            _ => vec![AssistantDelta::text(text)],
        }
    }
}

impl Renderer for ChatRenderer {
    fn render(&mut self, index: u32, response: InferStreamResponse) -> Vec<Event> {
        let (token, top_tokens, finish) = match response {
            InferStreamResponse::Prefill(_) => return vec![],
            InferStreamResponse::Intermediate { token, top_tokens } => (token, top_tokens, None),
            InferStreamResponse::End { token, top_tokens, generated_text, .. } => {
                if let Some(usage) = &mut self.usage {
                    *usage = Usage::new(usage.prompt_tokens, generated_text.generated_tokens);
                }
                (token, top_tokens, Some(generated_text.finish_reason))
            }
        };
        let text = if token.special { String::new() } else { token.text.clone() };
        let mut deltas = self.deltas(text);
        let finish_reason = finish.map(|reason| finish_reason(reason, self.called));
        // Every token has a chunk (its logprobs, the finish reason); one that adds
        // nothing has an empty text delta, as OpenAI's last chunk.
        if deltas.is_empty() {
            deltas.push(AssistantDelta::text(String::new()));
        }
        let last = deltas.len() - 1;
        deltas
            .into_iter()
            .enumerate()
            .map(|(i, delta)| {
                let choice = ChatChunkChoice {
                    index,
                    delta,
                    logprobs: (self.logprobs && i == 0)
                        .then(|| ChatLogprobs::new(std::slice::from_ref(&token), std::slice::from_ref(&top_tokens))),
                    finish_reason: finish_reason.filter(|_| i == last),
                };
                let chunk: ChatCompletionChunk = self.context.response(CHUNK, vec![choice], None);
                json_event(&chunk)
            })
            .collect()
    }

    fn finish(&mut self) -> Vec<Event> {
        stream_end::<ChatChunkChoice>(&self.context, CHUNK, self.usage)
    }
}
