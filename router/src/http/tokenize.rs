//! `POST /tokenize`.

use crate::api::generate::{GenerateRequest, SimpleToken};
use crate::error::{ApiError, TgiError};
use crate::http::openapi::TgiErrors;
use crate::http::server::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;

/// The prompt's tokens, as the model would see them (parameters are ignored).
#[utoipa::path(post, path = "/tokenize", tag = "Text Generation Inference", request_body = GenerateRequest,
    responses((status = 200, description = "Tokenized ids", body = Vec<SimpleToken>), TgiErrors))]
pub async fn tokenize(
    State(state): State<AppState>,
    payload: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Json<Vec<SimpleToken>>, TgiError> {
    let Json(request) = payload.map_err(ApiError::from)?;
    let encoding = state.validation.tokenize(request.inputs.clone(), true).await?;
    let tokens = encoding
        .get_ids()
        .iter()
        .zip(encoding.get_offsets())
        .map(|(&id, &(start, stop))| SimpleToken {
            id,
            // Offsets are bytes; a token inside a multi-byte character has no text of its own.
            text: request.inputs.get(start..stop).unwrap_or_default().to_string(),
            start,
            stop,
        })
        .collect();
    Ok(Json(tokens))
}
