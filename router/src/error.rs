//! Every error the HTTP layer answers with, mapped to a status and a body in one
//! place: TGI's `{"error", "error_type"}` on the native routes, OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` on `/v1/*`.

use crate::api::generate::ErrorResponse;
use crate::api::openai::{OpenAiErrorDetail, OpenAiErrorResponse};
use crate::infer_types::InferError;
use crate::validation::ValidationError;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Input validation error: {0}")]
    Validation(#[from] ValidationError),
    #[error(transparent)]
    Infer(#[from] InferError),
    /// The body is not JSON at all.
    #[error("Malformed JSON: {0}")]
    MalformedJson(String),
    /// The body is JSON but not the expected shape or types.
    #[error("Invalid request body: {0}")]
    InvalidBody(String),
    #[error("Expected request with `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("Payload too large")]
    PayloadTooLarge,
    #[error("Unauthorized")]
    Unauthorized,
    #[error("Model is not healthy")]
    Unhealthy,
    #[error("This model has no chat template")]
    NoChatTemplate,
}

/// Which API family the error is answered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Tgi,
    OpenAi,
}

impl Flavor {
    pub fn for_path(path: &str) -> Self {
        if path.starts_with("/v1/") {
            Flavor::OpenAi
        } else {
            Flavor::Tgi
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) | ApiError::InvalidBody(_) | ApiError::NoChatTemplate => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Infer(InferError::ValidationError(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Infer(InferError::Overloaded) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Infer(InferError::GenerationError(_)) => StatusCode::FAILED_DEPENDENCY,
            ApiError::Infer(InferError::IncompleteGeneration) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Infer(InferError::ShardStuck(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `error_type` of bodies and the `err` label of `tgi_request_failure`.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::Validation(ValidationError::ChatTemplate(_)) | ApiError::NoChatTemplate => "template_error",
            ApiError::Validation(_) | ApiError::InvalidBody(_) => "validation",
            ApiError::Infer(e) => e.error_type(),
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Unhealthy => "unhealthy",
        }
    }

    pub fn tgi_body(&self) -> ErrorResponse {
        ErrorResponse { error: self.to_string(), error_type: self.error_type().to_string() }
    }

    pub fn openai_body(&self) -> OpenAiErrorResponse {
        let error_type = match self.status() {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
            StatusCode::UNAUTHORIZED => "authentication_error",
            status if status.is_server_error() || status == StatusCode::FAILED_DEPENDENCY => "server_error",
            _ => "invalid_request_error",
        };
        OpenAiErrorResponse {
            error: OpenAiErrorDetail {
                message: self.to_string(),
                error_type: error_type.to_string(),
                param: None,
                code: Some(self.error_type().to_string()),
            },
        }
    }

    pub fn into_response(self, flavor: Flavor) -> Response {
        let status = self.status();
        match flavor {
            Flavor::Tgi => (status, Json(self.tgi_body())).into_response(),
            Flavor::OpenAi => (status, Json(self.openai_body())).into_response(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => ApiError::InvalidBody(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => ApiError::MalformedJson(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            other => ApiError::MalformedJson(other.body_text()),
        }
    }
}

/// An error answered in TGI's shape.
#[derive(Debug)]
pub struct TgiError(pub ApiError);

/// An error answered in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl<E: Into<ApiError>> From<E> for TgiError {
    fn from(error: E) -> Self {
        TgiError(error.into())
    }
}

impl<E: Into<ApiError>> From<E> for OpenAiError {
    fn from(error: E) -> Self {
        OpenAiError(error.into())
    }
}

impl IntoResponse for TgiError {
    fn into_response(self) -> Response {
        self.0.into_response(Flavor::Tgi)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        self.0.into_response(Flavor::OpenAi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_follow_tgi() {
        let cases = [
            (ApiError::from(ValidationError::EmptyInput), 422, "validation"),
            (ApiError::from(InferError::Overloaded), 429, "overloaded"),
            (ApiError::from(InferError::GenerationError("oom".into())), 424, "generation"),
            (ApiError::from(InferError::ValidationError("too big".into())), 422, "validation"),
            (ApiError::Unauthorized, 401, "unauthorized"),
            (ApiError::Unhealthy, 503, "unhealthy"),
            (ApiError::PayloadTooLarge, 413, "payload_too_large"),
            (ApiError::MalformedJson("eof".into()), 400, "malformed_json"),
            (ApiError::from(ValidationError::ChatTemplate("x".into())), 422, "template_error"),
        ];
        for (error, status, error_type) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            assert_eq!(error.error_type(), error_type, "{error}");
        }
    }

    #[test]
    fn bodies_in_both_shapes() {
        let error = ApiError::from(ValidationError::EmptyInput);
        assert_eq!(
            serde_json::to_value(error.tgi_body()).unwrap(),
            json!({"error": "Input validation error: `inputs` cannot be empty", "error_type": "validation"})
        );
        assert_eq!(
            serde_json::to_value(error.openai_body()).unwrap(),
            json!({"error": {"message": "Input validation error: `inputs` cannot be empty",
                             "type": "invalid_request_error", "param": null, "code": "validation"}})
        );
        assert_eq!(ApiError::from(InferError::Overloaded).openai_body().error.error_type, "rate_limit_exceeded");
    }

    #[test]
    fn flavor_follows_the_path() {
        assert_eq!(Flavor::for_path("/v1/chat/completions"), Flavor::OpenAi);
        assert_eq!(Flavor::for_path("/generate"), Flavor::Tgi);
    }
}
