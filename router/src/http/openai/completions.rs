//! `POST /v1/completions`: one choice per prompt.

use super::{stream_end, ResponseContext};
use crate::api::openai::{Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, OpenAiResponse, Usage};
use crate::api::{neutral_only, Object};
use crate::error::{ApiError, OpenAiError};
use crate::http::metrics::RequestMetrics;
use crate::http::openapi::OpenAiErrors;
use crate::http::server::AppState;
use crate::http::stream::{json_event, sse_response, Generation, Renderer};
use crate::infer_types::InferStreamResponse;
use crate::validation::ValidationError;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::try_join_all;

const OBJECT: &str = "text_completion";

/// Complete prompts (OpenAI's legacy Completions API).
#[utoipa::path(post, path = "/v1/completions", tag = "OpenAI", request_body = CompletionRequest,
    responses((status = 200, description = "One choice per prompt", content(
        (OpenAiResponse<CompletionChoice> = "application/json"), (OpenAiResponse<CompletionChoice> = "text/event-stream"))), OpenAiErrors))]
pub async fn completions(
    State(state): State<AppState>,
    payload: Result<Json<Object<CompletionRequest>>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    let metrics = RequestMetrics::new();
    Ok(metrics.observe(respond(&state, payload, metrics).await)?)
}

async fn respond(
    state: &AppState,
    payload: Result<Json<Object<CompletionRequest>>, JsonRejection>,
    metrics: RequestMetrics,
) -> Result<Response, ApiError> {
    let Json(Object(request)) = payload?;
    neutral_only::check(request.neutral_only())?;
    let logprobs = request.logprobs.is_some();
    let sampling = request.sampling(request.max_tokens, request.logprobs);
    let parameters = sampling.into_parameters(&state.info.generation_defaults)?;
    let prompts = request.prompt.into_vec();
    if prompts.is_empty() {
        return Err(ValidationError::OutOfRange { name: "prompt", expected: "a string or a non-empty list" }.into());
    }
    // Every prompt is validated before any is queued.
    let valid = try_join_all(prompts.iter().map(|p| state.validation.validate(p.clone(), &parameters, true))).await?;
    let metrics: Vec<RequestMetrics> =
        (0..valid.len()).map(|i| if i == 0 { metrics } else { metrics.another() }).collect();
    for (request, metrics) in valid.iter().zip(&metrics) {
        metrics.validated(request);
    }
    let context = ResponseContext::new(state, "cmpl");
    let input_lengths: Vec<u32> = valid.iter().map(|v| v.input_length()).collect();
    let echoes: Vec<String> = prompts.into_iter().map(|p| if request.echo { p } else { String::new() }).collect();

    if request.stream {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        let mut generations = Vec::with_capacity(valid.len());
        for ((index, valid), metrics) in (0u32..).zip(valid).zip(metrics) {
            let (permit, stream) = state.backend.generate_stream(valid)?;
            generations.push(Generation { index, permit, stream, metrics });
        }
        let usage = include_usage.then(|| Usage::new(input_lengths.iter().sum(), 0));
        let offsets = vec![0; echoes.len()];
        let renderer = CompletionRenderer { context, logprobs, echoes, offsets, usage };
        return Ok(sse_response(generations, renderer).into_response());
    }

    let responses = try_join_all(valid.into_iter().map(|v| state.backend.generate(v))).await?;
    let mut usage = Usage::new(0, 0);
    let mut choices = Vec::with_capacity(responses.len());
    for (index, ((response, metrics), echo)) in (0u32..).zip(responses.iter().zip(&metrics).zip(echoes)) {
        let generated = &response.generated_text;
        metrics.success(generated, response.queued, response.start);
        usage = usage + Usage::new(response.input_length, generated.generated_tokens);
        let offset = echo.chars().count();
        choices.push(CompletionChoice {
            index,
            text: echo + &generated.text,
            logprobs: logprobs.then(|| CompletionLogprobs::new(&response.tokens, &response.top_tokens, offset)),
            finish_reason: Some(generated.finish_reason.as_openai()),
        });
    }
    let completion: Completion = context.response(OBJECT, choices, Some(usage));
    Ok(Json(completion).into_response())
}

/// One chunk per token of any prompt; with `echo`, the prompt comes with its first token.
struct CompletionRenderer {
    context: ResponseContext,
    logprobs: bool,
    /// Emptied once sent.
    echoes: Vec<String>,
    /// Characters of each choice's text sent so far.
    offsets: Vec<usize>,
    usage: Option<Usage>,
}

impl Renderer for CompletionRenderer {
    fn render(&mut self, index: u32, response: InferStreamResponse) -> Vec<Event> {
        let (token, top_tokens, finish_reason) = match response {
            InferStreamResponse::Prefill(_) => return vec![],
            InferStreamResponse::Intermediate { token, top_tokens } => (token, top_tokens, None),
            InferStreamResponse::End { token, top_tokens, generated_text, .. } => {
                if let Some(usage) = &mut self.usage {
                    *usage = *usage + Usage::new(0, generated_text.generated_tokens);
                }
                (token, top_tokens, Some(generated_text.finish_reason.as_openai()))
            }
        };
        let i = index as usize;
        let echo = std::mem::take(&mut self.echoes[i]);
        let token_offset = self.offsets[i] + echo.chars().count();
        let logprobs =
            self.logprobs.then(|| CompletionLogprobs::new(std::slice::from_ref(&token), &[top_tokens], token_offset));
        // Special tokens (end of text) add no text, as in the non-streamed completion.
        let text = if token.special { echo } else { echo + &token.text };
        self.offsets[i] += text.chars().count();
        let choice = CompletionChoice { index, text, logprobs, finish_reason };
        let chunk: Completion = self.context.response(OBJECT, vec![choice], None);
        vec![json_event(&chunk)]
    }

    fn finish(&mut self) -> Vec<Event> {
        stream_end::<CompletionChoice>(&self.context, OBJECT, self.usage)
    }
}
