//! `POST /tokenize`.

use crate::api::generate::{GenerateRequest, SimpleToken};
use crate::api::Object;
use crate::error::{ApiError, TgiError};
use crate::http::openapi::TgiErrors;
use crate::http::server::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;

/// The prompt's tokens, as the model would see them (parameters are checked, not used).
#[utoipa::path(post, path = "/tokenize", tag = "Text Generation Inference", request_body = GenerateRequest,
    responses((status = 200, description = "Tokenized ids", body = Vec<SimpleToken>), TgiErrors))]
pub async fn tokenize(
    State(state): State<AppState>,
    payload: Result<Json<Object<GenerateRequest>>, JsonRejection>,
) -> Result<Json<Vec<SimpleToken>>, TgiError> {
    let Json(Object(request)) = payload.map_err(ApiError::from)?;
    state.validation.check_parameters(&request.parameters)?;
    let encoding = state.validation.tokenize(request.inputs.clone(), true).await?;
    // Byte-level tokenizers leave the leading space out of a token's offsets: each
    // token's text starts where the previous one stopped, so that the texts add up to the prompt.
    let mut previous_stop = 0;
    let tokens = encoding
        .get_ids()
        .iter()
        .zip(encoding.get_offsets())
        .map(|(&id, &(start, stop))| {
            // Several byte tokens of one multi-byte character share its offsets: the first gets the text.
            let (start, stop) = if stop > previous_stop { (previous_stop.min(start), stop) } else { (stop, stop) };
            previous_stop = stop.max(previous_stop);
            let text = request.inputs.get(start..stop).unwrap_or_default().to_string();
            SimpleToken { id, text, start, stop }
        })
        .collect();
    Ok(Json(tokens))
}
