//! `GET /info` and `GET /health`.

use crate::api::generate::{ErrorResponse, Info};
use crate::error::{ApiError, TgiError};
use crate::http::server::AppState;
use axum::extract::State;
use axum::Json;

/// Model and server settings.
#[utoipa::path(get, path = "/info", tag = "Text Generation Inference",
    responses((status = 200, description = "Served model info", body = Info)))]
pub async fn info(State(state): State<AppState>) -> Json<Info> {
    Json(state.info.as_ref().clone())
}

/// 200 when every shard answers (or a generation just succeeded), 503 otherwise.
#[utoipa::path(get, path = "/health", tag = "Text Generation Inference",
    responses((status = 200, description = "Everything is working fine"),
              (status = 503, description = "Text generation inference is down", body = ErrorResponse)))]
pub async fn health(State(state): State<AppState>) -> Result<(), TgiError> {
    if state.backend.health().await {
        Ok(())
    } else {
        Err(ApiError::Unhealthy.into())
    }
}
