//! `POST /v1/chat/completions`.

use super::{stream_end, ResponseContext};
use crate::api::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatLogprobs, OpenAiResponse, Usage,
};
use crate::api::{neutral_only, Object};
use crate::error::{ApiError, OpenAiError};
use crate::http::metrics::RequestMetrics;
use crate::http::openapi::OpenAiErrors;
use crate::http::server::AppState;
use crate::http::stream::{json_event, sse_response, Generation, Renderer};
use crate::infer_types::InferStreamResponse;
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
    let logprobs = request.logprobs.unwrap_or(false);
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let sampling = request.sampling(max_tokens, request.top_logprobs.filter(|_| logprobs));
    let parameters = sampling.into_parameters(&state.info.generation_defaults)?;
    let template = state.chat_template.as_ref().ok_or(ApiError::NoChatTemplate)?;
    let prompt = template.apply(request.messages)?;
    // The template already wrote the special tokens the model expects.
    let valid = state.validation.validate(prompt, &parameters, false).await?;
    metrics.validated(&valid);
    let context = ResponseContext::new(state, "chatcmpl");
    let input_length = valid.input_length();

    if request.stream {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        let renderer = ChatRenderer { context, logprobs, usage: include_usage.then(|| Usage::new(input_length, 0)) };
        let (permit, stream) = state.backend.generate_stream(valid)?;
        return Ok(sse_response(vec![Generation { index: 0, permit, stream, metrics }], renderer).into_response());
    }

    let response = state.backend.generate(valid).await?;
    metrics.success(&response.generated_text, response.queued, response.start);
    let generated = &response.generated_text;
    let choice = ChatChoice {
        index: 0,
        message: AssistantMessage::new(generated.text.clone()),
        logprobs: logprobs.then(|| ChatLogprobs::new(&response.tokens, &response.top_tokens)),
        finish_reason: generated.finish_reason.as_openai(),
    };
    let usage = Usage::new(input_length, generated.generated_tokens);
    let completion: ChatCompletion = context.response(COMPLETION, vec![choice], Some(usage));
    Ok(Json(completion).into_response())
}

/// One chunk per token; special tokens (the end-of-turn token) add no text.
struct ChatRenderer {
    context: ResponseContext,
    logprobs: bool,
    /// Counted only with `stream_options.include_usage`.
    usage: Option<Usage>,
}

impl Renderer for ChatRenderer {
    fn render(&mut self, index: u32, response: InferStreamResponse) -> Vec<Event> {
        let (token, top_tokens, finish_reason) = match response {
            InferStreamResponse::Prefill(_) => return vec![],
            InferStreamResponse::Intermediate { token, top_tokens } => (token, top_tokens, None),
            InferStreamResponse::End { token, top_tokens, generated_text, .. } => {
                if let Some(usage) = &mut self.usage {
                    *usage = Usage::new(usage.prompt_tokens, generated_text.generated_tokens);
                }
                (token, top_tokens, Some(generated_text.finish_reason.as_openai()))
            }
        };
        let content = if token.special { String::new() } else { token.text.clone() };
        let choice = ChatChunkChoice {
            index,
            delta: AssistantMessage::new(content),
            logprobs: self.logprobs.then(|| ChatLogprobs::new(std::slice::from_ref(&token), &[top_tokens])),
            finish_reason,
        };
        let chunk: ChatCompletionChunk = self.context.response(CHUNK, vec![choice], None);
        vec![json_event(&chunk)]
    }

    fn finish(&mut self) -> Vec<Event> {
        stream_end::<ChatChunkChoice>(&self.context, CHUNK, self.usage)
    }
}
