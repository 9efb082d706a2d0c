//! TGI's native generation routes: `/generate`, `/generate_stream` and `/`.

use crate::api::generate::{
    tokens, CompatGenerateRequest, Details, GenerateRequest, GenerateResponse, StreamDetails, StreamResponse, Token,
};
use crate::api::Object;
use crate::error::{ApiError, TgiError};
use crate::http::metrics::RequestMetrics;
use crate::http::openapi::TgiErrors;
use crate::http::server::AppState;
use crate::http::stream::{json_event, sse_response, Generation, Renderer};
use crate::infer_types::InferStreamResponse;
use crate::validation::{with_model_defaults, ValidationError};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Generate tokens.
#[utoipa::path(post, path = "/generate", tag = "Text Generation Inference", request_body = GenerateRequest,
    responses((status = 200, description = "Generated text", body = GenerateResponse), TgiErrors))]
pub async fn generate(
    State(state): State<AppState>,
    payload: Result<Json<Object<GenerateRequest>>, JsonRejection>,
) -> Result<Response, TgiError> {
    let metrics = RequestMetrics::new();
    let Json(Object(request)) = metrics.observe(payload.map_err(ApiError::from))?;
    let response = metrics.observe(generate_response(&state, request, metrics).await)?;
    Ok(Json(response).into_response())
}

/// Generate a stream of tokens as server-sent events.
#[utoipa::path(post, path = "/generate_stream", tag = "Text Generation Inference", request_body = GenerateRequest,
    responses((status = 200, description = "Generated tokens", content_type = "text/event-stream", body = StreamResponse),
              TgiErrors))]
pub async fn generate_stream(
    State(state): State<AppState>,
    payload: Result<Json<Object<GenerateRequest>>, JsonRejection>,
) -> Result<Response, TgiError> {
    let metrics = RequestMetrics::new();
    let Json(Object(request)) = metrics.observe(payload.map_err(ApiError::from))?;
    Ok(metrics.observe(stream_response(&state, request, metrics).await)?)
}

/// `/generate_stream`, or `/generate` with the response in a list (as Hugging Face's
/// Inference API answers, which clients of this route expect), as `stream` says.
#[utoipa::path(post, path = "/", tag = "Text Generation Inference", request_body = CompatGenerateRequest,
    responses((status = 200, description = "Generated text", content(
        (Vec<GenerateResponse> = "application/json"), (StreamResponse = "text/event-stream"))), TgiErrors))]
pub async fn compat_generate(
    State(state): State<AppState>,
    payload: Result<Json<Object<CompatGenerateRequest>>, JsonRejection>,
) -> Result<Response, TgiError> {
    let metrics = RequestMetrics::new();
    let Json(Object(request)) = metrics.observe(payload.map_err(ApiError::from))?;
    let stream = request.stream;
    let response = if stream {
        stream_response(&state, request.into(), metrics).await
    } else {
        generate_response(&state, request.into(), metrics).await.map(|response| Json(vec![response]).into_response())
    };
    Ok(metrics.observe(response)?)
}

async fn generate_response(
    state: &AppState,
    request: GenerateRequest,
    metrics: RequestMetrics,
) -> Result<GenerateResponse, ApiError> {
    let parameters = with_model_defaults(&request.parameters, &state.info.generation_defaults);
    let valid = state.validation.validate(request.inputs, &parameters, true).await?;
    metrics.validated(&valid);
    let prefix = full_text_prefix(parameters.return_full_text, &valid.inputs);
    let top_n_tokens = valid.top_n_tokens;
    let response = state.backend.generate(valid).await?;
    metrics.success(&response.generated_text, response.queued, response.start);
    let details = parameters.details.then(|| Details {
        finish_reason: response.generated_text.finish_reason.as_tgi(),
        generated_tokens: response.generated_text.generated_tokens,
        seed: response.generated_text.seed,
        prefill: tokens(&response.prefill),
        tokens: tokens(&response.tokens),
        top_tokens: if top_n_tokens > 0 { response.top_tokens.iter().map(|t| tokens(t)).collect() } else { vec![] },
    });
    let generated_text = prefix + &response.generated_text.text;
    Ok(GenerateResponse { generated_text, details })
}

async fn stream_response(
    state: &AppState,
    request: GenerateRequest,
    metrics: RequestMetrics,
) -> Result<Response, ApiError> {
    let parameters = with_model_defaults(&request.parameters, &state.info.generation_defaults);
    if parameters.decoder_input_details {
        return Err(ValidationError::PrefillDetailsStream.into());
    }
    let valid = state.validation.validate(request.inputs, &parameters, true).await?;
    metrics.validated(&valid);
    let renderer = TgiRenderer {
        tokens: 0,
        input_length: valid.input_length(),
        prefix: full_text_prefix(parameters.return_full_text, &valid.inputs),
    };
    let (permit, stream) = state.backend.generate_stream(valid)?;
    let generation = Generation { index: 0, permit, stream, metrics };
    Ok(sse_response(vec![generation], renderer).into_response())
}

fn full_text_prefix(return_full_text: Option<bool>, inputs: &str) -> String {
    if return_full_text.unwrap_or(false) {
        inputs.to_string()
    } else {
        String::new()
    }
}

/// One event per token; the last one carries the whole text and the details.
struct TgiRenderer {
    tokens: u32,
    input_length: u32,
    prefix: String,
}

impl Renderer for TgiRenderer {
    fn render(&mut self, _index: u32, response: InferStreamResponse) -> Vec<Event> {
        let (token, top_tokens, end) = match response {
            InferStreamResponse::Prefill(_) => return vec![],
            InferStreamResponse::Intermediate { token, top_tokens } => (token, top_tokens, None),
            InferStreamResponse::End { token, top_tokens, generated_text, .. } => {
                (token, top_tokens, Some(generated_text))
            }
        };
        self.tokens += 1;
        let event = StreamResponse {
            index: self.tokens,
            token: Token::from(&token),
            top_tokens: tokens(&top_tokens),
            generated_text: end.as_ref().map(|g| format!("{}{}", self.prefix, g.text)),
            details: end.map(|g| StreamDetails {
                finish_reason: g.finish_reason.as_tgi(),
                generated_tokens: g.generated_tokens,
                seed: g.seed,
                input_length: self.input_length,
            }),
        };
        vec![json_event(&event)]
    }

    fn finish(&mut self) -> Vec<Event> {
        vec![]
    }
}
