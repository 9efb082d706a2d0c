//! Prometheus metrics with TGI's names, recorded by the routes, and `GET /metrics`.

use crate::error::ApiError;
use crate::http::server::AppState;
use crate::infer_types::{GeneratedText, ValidGenerateRequest};
use axum::extract::State;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::time::Instant;

const TOKEN_HISTOGRAMS: [&str; 3] =
    ["tgi_request_input_length", "tgi_request_generated_tokens", "tgi_request_max_new_tokens"];

/// A recorder whose histograms have buckets fit for their values: every `*_duration`
/// (the router's and the batching loop's, as TGI) in seconds from 1 ms to ~2 min,
/// and token counts up to `max_total_tokens`.
pub fn prometheus_builder(max_total_tokens: u32) -> PrometheusBuilder {
    let seconds: Vec<f64> = (0..18).map(|i| 0.001 * 2f64.powi(i)).collect();
    let tokens: Vec<f64> = std::iter::successors(Some(1.0), |t| Some(t * 2.0))
        .take_while(|&t| t < max_total_tokens as f64)
        .chain([max_total_tokens as f64])
        .collect();
    let mut builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration".to_string()), &seconds)
        .expect("bucket lists are never empty");
    for name in TOKEN_HISTOGRAMS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), &tokens)
            .expect("bucket lists are never empty");
    }
    builder
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "Server",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn render(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// The metrics of one generation, from the moment its HTTP request arrived.
#[derive(Debug, Clone, Copy)]
pub struct RequestMetrics {
    start: Instant,
}

impl RequestMetrics {
    pub fn new() -> Self {
        metrics::counter!("tgi_request_count").increment(1);
        Self { start: Instant::now() }
    }

    /// Another generation of the same HTTP request (several prompts in one completion request).
    pub fn another(&self) -> Self {
        metrics::counter!("tgi_request_count").increment(1);
        Self { start: self.start }
    }

    pub fn validated(&self, request: &ValidGenerateRequest) {
        metrics::histogram!("tgi_request_validation_duration").record(self.start.elapsed().as_secs_f64());
        metrics::histogram!("tgi_request_input_length").record(request.input_length() as f64);
        metrics::histogram!("tgi_request_max_new_tokens").record(request.stopping_parameters.max_new_tokens as f64);
    }

    /// `queued`: when the request entered the queue; `start`: when its prefill started.
    pub fn success(&self, generated: &GeneratedText, queued: Instant, start: Instant) {
        let total = self.start.elapsed();
        let queue = start.saturating_duration_since(queued);
        let inference = start.elapsed();
        let per_token = inference / generated.generated_tokens.max(1);
        metrics::counter!("tgi_request_success").increment(1);
        metrics::histogram!("tgi_request_duration").record(total.as_secs_f64());
        metrics::histogram!("tgi_request_queue_duration").record(queue.as_secs_f64());
        metrics::histogram!("tgi_request_inference_duration").record(inference.as_secs_f64());
        metrics::histogram!("tgi_request_mean_time_per_token_duration").record(per_token.as_secs_f64());
        metrics::histogram!("tgi_request_generated_tokens").record(generated.generated_tokens as f64);
        tracing::info!(
            total_time = ?total,
            queue_time = ?queue,
            inference_time = ?inference,
            time_per_token = ?per_token,
            generated_tokens = generated.generated_tokens,
            finish_reason = generated.finish_reason.as_tgi(),
            "Success"
        );
    }

    pub fn failure(&self, error: &ApiError) {
        metrics::counter!("tgi_request_failure", "err" => error.error_type()).increment(1);
        tracing::warn!(error_type = error.error_type(), "{error}");
    }

    /// Records the failure, if any, of what the request came to.
    pub fn observe<T>(&self, result: Result<T, ApiError>) -> Result<T, ApiError> {
        if let Err(error) = &result {
            self.failure(error);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer_types::FinishReason;

    #[test]
    fn records_tgi_metric_names() {
        let recorder = prometheus_builder(64).build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let request = RequestMetrics::new();
            let generated = GeneratedText {
                text: "x".into(),
                generated_tokens: 3,
                finish_reason: FinishReason::Length,
                seed: None,
            };
            request.success(&generated, Instant::now(), Instant::now());
            request.failure(&ApiError::Unhealthy);
        });
        let text = handle.render();
        for name in ["tgi_request_count", "tgi_request_success", "tgi_request_failure{err=\"unhealthy\"}"] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(text.contains("tgi_request_generated_tokens_bucket{le=\"4\"} 1"), "{text}");
        assert!(text.contains("tgi_request_generated_tokens_bucket{le=\"64\"} 1"), "{text}");
    }
}
