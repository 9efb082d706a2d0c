//! The axum app: routes, shared state and middleware (API key, CORS, body limit, tracing).

use crate::api::generate::Info;
use crate::error::{ApiError, Flavor};
use crate::http::backend::Backend;
use crate::http::{generate, info, metrics, openai, openapi, tokenize};
use crate::validation::chat_template::ChatTemplate;
use crate::validation::Validation;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub validation: Arc<Validation>,
    /// `None` when the model has none: chat completions answer 422.
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub info: Arc<Info>,
    pub metrics: PrometheusHandle,
}

#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Required as `Authorization: Bearer <key>` on every route but /health, /metrics, /info, /openapi.json.
    pub api_key: Option<String>,
    /// Origins allowed by CORS; `*` allows any. Empty: no CORS headers.
    pub cors_allow_origin: Vec<String>,
    /// Largest accepted request body, in bytes.
    pub payload_limit: usize,
}

pub fn app(state: AppState, config: &ServerConfig) -> Router {
    let mut guarded = Router::new()
        .route("/", post(generate::compat_generate))
        .route("/generate", post(generate::generate))
        .route("/generate_stream", post(generate::generate_stream))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/v1/chat/completions", post(openai::chat::chat_completions))
        .route("/v1/completions", post(openai::completions::completions))
        .route("/v1/models", get(openai::models));
    if let Some(key) = &config.api_key {
        guarded = guarded.route_layer(middleware::from_fn_with_state(Arc::new(key.clone()), require_api_key));
    }
    let open = Router::new()
        .route("/health", get(info::health))
        .route("/info", get(info::info))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::openapi_json));
    let mut app = guarded
        .merge(open)
        .layer(DefaultBodyLimit::max(config.payload_limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state);
    if !config.cors_allow_origin.is_empty() {
        app = app.layer(cors(&config.cors_allow_origin));
    }
    app
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
}

async fn require_api_key(State(key): State<Arc<String>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Constant time: the comparison must not tell how much of the key was right.
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response(Flavor::for_path(request.uri().path()))
    }
}
