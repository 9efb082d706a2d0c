//! The whole app over a scripted backend: routing, validation before queueing,
//! error shapes, SSE framing, API key, body limit and cancellation on disconnect.

use crate::api::generate::Info;
use crate::http::backend::{Backend, InferStream};
use crate::http::metrics::prometheus_builder;
use crate::http::server::{app, AppState, ServerConfig};
use crate::infer_types::*;
use crate::validation::chat_template::ChatTemplate;
use crate::validation::grammar::GrammarSupport;
use grammar::GrammarSpec;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use model_store::SamplingDefaults;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tower::ServiceExt;

/// The sending half of an [`InferStream`].
type StreamSender = mpsc::UnboundedSender<Result<InferStreamResponse, InferError>>;

/// Answers every request with the tokens "paris" then "." (the end), or with `failure` after the first token.
struct ScriptedBackend {
    permits: Arc<Semaphore>,
    failure: Option<InferError>,
    /// Every request that reached inference.
    requests: Mutex<Vec<ValidGenerateRequest>>,
    /// When set, streams stay open after the script, and their senders are kept here.
    open_streams: Option<Mutex<Vec<StreamSender>>>,
}

impl ScriptedBackend {
    fn new() -> Self {
        Self { permits: Arc::new(Semaphore::new(8)), failure: None, requests: Mutex::default(), open_streams: None }
    }

    fn script(&self) -> Vec<Result<InferStreamResponse, InferError>> {
        let token = |id, text: &str, special| Token { id, text: text.into(), logprob: -0.25, special };
        let first = Ok(InferStreamResponse::Intermediate { token: token(6, "paris", false), top_tokens: vec![] });
        let end = match &self.failure {
            Some(error) => Err(error.clone()),
            None => Ok(InferStreamResponse::End {
                token: token(2, "</s>", true),
                top_tokens: vec![],
                generated_text: GeneratedText {
                    text: "paris".into(),
                    generated_tokens: 2,
                    finish_reason: FinishReason::EosToken,
                    seed: None,
                },
                queued: Instant::now(),
                start: Instant::now(),
            }),
        };
        vec![first, end]
    }

    fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

impl Backend for ScriptedBackend {
    fn generate_stream(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<(OwnedSemaphorePermit, InferStream), InferError> {
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| InferError::Overloaded)?;
        self.requests.lock().unwrap().push(request);
        let (sender, receiver) = mpsc::unbounded_channel();
        for message in self.script() {
            sender.send(message).unwrap();
        }
        if let Some(open) = &self.open_streams {
            open.lock().unwrap().push(sender);
        }
        Ok((permit, UnboundedReceiverStream::new(receiver)))
    }

    fn generate(&self, request: ValidGenerateRequest) -> BoxFuture<'_, Result<InferResponse, InferError>> {
        let input_length = request.input_length();
        let result = self.generate_stream(request).map(|(_permit, _)| {
            let mut tokens = Vec::new();
            for message in self.script() {
                match message? {
                    InferStreamResponse::Intermediate { token, .. } => tokens.push(token),
                    InferStreamResponse::End { token, generated_text, queued, start, .. } => {
                        tokens.push(token);
                        let top_tokens = vec![vec![]; tokens.len()];
                        return Ok(InferResponse {
                            prefill: vec![],
                            input_length,
                            tokens,
                            top_tokens,
                            generated_text,
                            queued,
                            start,
                        });
                    }
                    InferStreamResponse::Prefill(_) => {}
                }
            }
            Err(InferError::IncompleteGeneration)
        });
        Box::pin(async move { result? })
    }

    fn health(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

/// The `/info` of a test server with these limits.
pub(crate) fn test_info(
    max_input_tokens: u32,
    max_total_tokens: u32,
    max_batch_prefill_tokens: u32,
    max_batch_total_tokens: u32,
) -> Info {
    Info {
        model_id: "test-model".into(),
        model_sha: None,
        model_dtype: "float32".into(),
        model_device_type: "cpu".into(),
        model_pipeline_tag: None,
        max_concurrent_requests: 8,
        max_best_of: 1,
        max_stop_sequences: 4,
        max_top_n_tokens: 5,
        max_input_tokens,
        max_total_tokens,
        max_batch_prefill_tokens,
        max_batch_total_tokens,
        max_batch_size: None,
        max_waiting_tokens: 20,
        waiting_served_ratio: 0.3,
        validation_workers: 2,
        world_size: 1,
        block_size: 16,
        prefix_caching: true,
        quantization: "none".into(),
        generation_defaults: Default::default(),
        router: "text-generation-router",
        version: "0",
        sha: None,
        docker_label: None,
    }
}

fn test_app(backend: Arc<ScriptedBackend>, config: ServerConfig) -> Router {
    test_app_with_defaults(backend, config, SamplingDefaults::default())
}

/// A test app serving a model whose generation_config.json gives these sampling defaults.
fn test_app_with_defaults(backend: Arc<ScriptedBackend>, config: ServerConfig, defaults: SamplingDefaults) -> Router {
    let validation = crate::validation::tests::validation_with_grammar(5, 200, GrammarSupport::Disabled);
    test_app_with(backend, config, defaults, validation)
}

/// A test app checking grammars with the default model's tokenizer (and room for the
/// tools' system prompt).
fn test_app_with_grammars(backend: Arc<ScriptedBackend>) -> Router {
    let support = crate::validation::grammar::tests::smollm2_support();
    let validation = crate::validation::tests::validation_with_grammar(500, 600, support);
    test_app_with(backend, ServerConfig::default(), SamplingDefaults::default(), validation)
}

fn test_app_with(
    backend: Arc<ScriptedBackend>,
    config: ServerConfig,
    defaults: SamplingDefaults,
    validation: crate::validation::Validation,
) -> Router {
    let template = "{% for m in messages %}{{ m.content }} {% endfor %}{% if add_generation_prompt %}is{% endif %}";
    let info = Info {
        validation_workers: 1,
        generation_defaults: defaults,
        ..test_info(5, 10, 10, 100)
    };
    let state = AppState {
        backend,
        validation: Arc::new(validation),
        chat_template: Some(Arc::new(ChatTemplate::new(template.into(), None, None).unwrap())),
        info: Arc::new(info),
        metrics: prometheus_builder(10).build_recorder().handle(),
    };
    app(state, &ServerConfig { payload_limit: 1000, ..config })
}

fn post(path: &str, body: Value) -> Request<Body> {
    Request::post(path).header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_string())).unwrap()
}

async fn call(app: &Router, request: Request<Body>) -> (StatusCode, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn call_json(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let (status, body) = call(app, request).await;
    (status, serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}")))
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|event| event.strip_prefix("data: ")).map(str::to_string).collect()
}

#[tokio::test]
async fn generate_answers_in_tgi_shape() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app(backend.clone(), ServerConfig::default());
    let body = json!({"inputs": "the capital of", "parameters": {"details": true, "max_new_tokens": 3, "return_full_text": true}});
    let (status, response) = call_json(&app, post("/generate", body)).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(response["generated_text"], "the capital ofparis");
    assert_eq!(response["details"]["finish_reason"], "eos_token");
    assert_eq!(response["details"]["generated_tokens"], 2);
    assert_eq!(response["details"]["tokens"][0], json!({"id": 6, "text": "paris", "logprob": -0.25, "special": false}));
    let queued = &backend.requests.lock().unwrap()[0];
    assert_eq!(queued.input_ids.as_slice(), &[3, 4, 5]);
    assert_eq!(queued.stopping_parameters.max_new_tokens, 3);
}

#[tokio::test]
async fn invalid_requests_are_rejected_before_queueing() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app(backend.clone(), ServerConfig::default());
    let cases = [
        ("/generate", json!({"inputs": "the", "parameters": {"temperature": 0.0}}), "validation"),
        ("/generate", json!({"inputs": "", "parameters": {}}), "validation"),
        ("/generate", json!({"inputs": "the capital of france is the", "parameters": {}}), "validation"),
        ("/generate", json!({"inputs": "the", "parameters": {"max_new_tokens": 300}}), "validation"),
        ("/generate", json!({"inputs": "the", "parameters": {"max_new_tokens": -1}}), "validation"),
        ("/generate_stream", json!({"inputs": "the", "parameters": {"decoder_input_details": true}}), "validation"),
        ("/", json!({"inputs": "the", "stream": true, "parameters": {"top_p": 2.0}}), "validation"),
        ("/generate", json!({"parameters": {}}), "validation"),
    ];
    for (path, body, error_type) in cases {
        let (status, response) = call_json(&app, post(path, body.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {response}");
        assert_eq!(response["error_type"], error_type, "{body}: {response}");
        assert!(response["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(backend.request_count(), 0);
}

#[tokio::test]
async fn malformed_bodies_map_to_400_413_415() {
    let app = test_app(Arc::new(ScriptedBackend::new()), ServerConfig::default());
    let malformed =
        Request::post("/generate").header(header::CONTENT_TYPE, "application/json").body(Body::from("{")).unwrap();
    let (status, response) = call_json(&app, malformed).await;
    assert_eq!((status, response["error_type"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_json")));
    let (status, response) = call_json(&app, Request::post("/generate").body(Body::from("{}")).unwrap()).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{response}");
    let huge = json!({"inputs": "the ".repeat(500)});
    let (status, response) = call_json(&app, post("/v1/completions", huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(response["error"]["type"], "invalid_request_error", "{response}");
}

#[tokio::test]
async fn compat_route_answers_a_list_when_not_streaming() {
    let app = test_app(Arc::new(ScriptedBackend::new()), ServerConfig::default());
    let (status, response) = call_json(&app, post("/", json!({"inputs": "the", "stream": false}))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response, json!([{"generated_text": "paris"}]));
}

#[tokio::test]
async fn generate_stream_sends_one_event_per_token() {
    let app = test_app(Arc::new(ScriptedBackend::new()), ServerConfig::default());
    let (status, body) = call(&app, post("/", json!({"inputs": "the capital", "stream": true}))).await;
    assert_eq!(status, StatusCode::OK);
    let events: Vec<Value> = sse_data(&body).iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(events.len(), 2, "{body}");
    assert_eq!(events[0]["index"], 1);
    assert_eq!(events[0]["token"]["text"], "paris");
    assert_eq!(events[0]["generated_text"], Value::Null);
    assert_eq!(events[1]["generated_text"], "paris");
    assert_eq!(
        events[1]["details"],
        json!({"finish_reason": "eos_token", "generated_tokens": 2, "seed": null, "input_length": 2})
    );
}

#[tokio::test]
async fn failures_in_the_middle_of_a_stream_end_it_with_an_error_event() {
    let backend =
        ScriptedBackend { failure: Some(InferError::GenerationError("shard died".into())), ..ScriptedBackend::new() };
    let app = test_app(Arc::new(backend), ServerConfig::default());
    let (status, body) = call(&app, post("/generate_stream", json!({"inputs": "the"}))).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&body);
    assert_eq!(data.len(), 2);
    let error: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(error, json!({"error": "Request failed during generation: shard died", "error_type": "generation"}));
    // Non-streamed, the same failure is a 424.
    let (status, response) = call_json(&app, post("/generate", json!({"inputs": "the"}))).await;
    assert_eq!((status, response["error_type"].as_str()), (StatusCode::FAILED_DEPENDENCY, Some("generation")));
}

#[tokio::test]
async fn overload_is_429_in_both_shapes() {
    let backend = ScriptedBackend { permits: Arc::new(Semaphore::new(0)), ..ScriptedBackend::new() };
    let app = test_app(Arc::new(backend), ServerConfig::default());
    let (status, response) = call_json(&app, post("/generate_stream", json!({"inputs": "the"}))).await;
    assert_eq!((status, response["error_type"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("overloaded")));
    let chat = json!({"messages": [{"role": "user", "content": "the"}]});
    let (status, response) = call_json(&app, post("/v1/chat/completions", chat)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response["error"]["type"], "rate_limit_exceeded");
}

#[tokio::test]
async fn chat_completion_in_openai_shape() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app(backend.clone(), ServerConfig::default());
    let chat = json!({"model": "x", "messages": [{"role": "user", "content": [{"type": "text", "text": "the capital"}]}],
                      "temperature": 0, "max_tokens": 4, "logprobs": true});
    let (status, response) = call_json(&app, post("/v1/chat/completions", chat)).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(response["object"], "chat.completion");
    assert_eq!(response["model"], "test-model");
    assert!(response["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(response["choices"][0]["message"], json!({"role": "assistant", "content": "paris"}));
    assert_eq!(response["choices"][0]["finish_reason"], "stop");
    assert_eq!(response["choices"][0]["logprobs"]["content"][0]["token"], "paris");
    // The template renders "the capital is": 3 prompt tokens.
    assert_eq!(response["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}));
    let queued = &backend.requests.lock().unwrap()[0];
    assert!(!queued.parameters.do_sample, "temperature 0 is greedy");
    assert_eq!(queued.stopping_parameters.max_new_tokens, 4);
}

#[tokio::test]
async fn sampling_fields_reach_the_queue_on_every_route() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app(backend.clone(), ServerConfig::default());
    let sampling = json!({"min_p": 0.1, "top_k": 20, "repetition_penalty": 1.1, "seed": 5});
    let mut chat = json!({"messages": [{"role": "user", "content": "the"}]});
    let mut completion = json!({"prompt": "the"});
    let mut generate = json!({"inputs": "the", "parameters": {}});
    for body in [&mut chat, &mut completion, &mut generate["parameters"]] {
        body.as_object_mut().unwrap().extend(sampling.as_object().unwrap().clone());
    }
    for (path, body) in [("/v1/chat/completions", chat), ("/v1/completions", completion), ("/generate", generate)] {
        let (status, response) = call_json(&app, post(path, body)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {response}");
        let queued = backend.requests.lock().unwrap().pop().unwrap().parameters;
        assert!(queued.do_sample, "{path}");
        assert_eq!((queued.min_p, queued.top_k, queued.repetition_penalty, queued.seed), (0.1, 20, 1.1, 5), "{path}");
    }
}

#[tokio::test]
async fn min_p_out_of_range_is_a_422_naming_it() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app(backend.clone(), ServerConfig::default());
    for min_p in [1.5, -0.1] {
        let cases = [
            ("/generate", json!({"inputs": "the", "parameters": {"min_p": min_p}})),
            ("/v1/completions", json!({"prompt": "the", "min_p": min_p})),
            ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "the"}], "min_p": min_p, "temperature": 0})),
        ];
        for (path, body) in cases {
            let (status, response) = call_json(&app, post(path, body)).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {response}");
            let message = response["error"].as_str().or(response["error"]["message"].as_str()).unwrap();
            assert!(message.contains("`min_p` must be in [0, 1]"), "{path}: {message}");
        }
    }
    // A wrong type: serde's message names the field too.
    let (status, response) = call_json(&app, post("/v1/completions", json!({"prompt": "the", "min_p": "x"}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(response["error"]["message"].as_str().unwrap().contains("min_p: invalid type"), "{response}");
    assert_eq!(backend.request_count(), 0);
}

#[tokio::test]
async fn model_defaults_apply_as_each_api_does_and_info_reports_them() {
    let defaults =
        SamplingDefaults { temperature: Some(0.6), top_p: Some(0.9), repetition_penalty: Some(1.1), ..Default::default() };
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app_with_defaults(backend.clone(), ServerConfig::default(), defaults);
    let (_, info) = call_json(&app, Request::get("/info").body(Body::empty()).unwrap()).await;
    assert_eq!(info["generation_defaults"], json!({"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1}));
    let message = json!([{"role": "user", "content": "the"}]);
    // (do_sample, temperature, top_p, repetition_penalty) of the queued request.
    let cases = [
        // OpenAI, as vLLM: every unset field; temperature 0 is greedy but keeps the penalty.
        ("/v1/chat/completions", json!({"messages": message}), (true, 0.6, 0.9, 1.1)),
        ("/v1/completions", json!({"prompt": "the", "top_p": 0.5}), (true, 0.6, 0.5, 1.1)),
        ("/v1/completions", json!({"prompt": "the", "temperature": 0}), (false, 1.0, 1.0, 1.1)),
        // TGI: greedy requests stay as they are; sampled ones take the defaults.
        ("/generate", json!({"inputs": "the"}), (false, 1.0, 1.0, 1.0)),
        ("/generate", json!({"inputs": "the", "parameters": {"do_sample": true}}), (true, 0.6, 0.9, 1.1)),
        ("/generate_stream", json!({"inputs": "the", "parameters": {"temperature": 0.8}}), (true, 0.8, 0.9, 1.1)),
    ];
    for (path, body, expected) in cases {
        let (status, response) = call(&app, post(path, body.clone())).await;
        assert_eq!(status, StatusCode::OK, "{body}: {response}");
        let queued = backend.requests.lock().unwrap().pop().unwrap().parameters;
        let sampling = (queued.do_sample, queued.temperature, queued.top_p, queued.repetition_penalty);
        assert_eq!(sampling, expected, "{path} {body}");
    }
}

#[tokio::test]
async fn chat_stream_ends_with_usage_and_done() {
    let app = test_app(Arc::new(ScriptedBackend::new()), ServerConfig::default());
    let chat = json!({"messages": [{"role": "user", "content": "the"}], "stream": true, "stream_options": {"include_usage": true}});
    let (status, body) = call(&app, post("/v1/chat/completions", chat)).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&body);
    assert_eq!(data.len(), 4, "{body}");
    let chunks: Vec<Value> = data[..3].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": "paris"}));
    assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
    // The end-of-turn token adds no text.
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "");
    assert_eq!(chunks[1]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[2]["choices"], json!([]));
    assert_eq!(chunks[2]["usage"], json!({"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}));
    assert_eq!(chunks[0]["id"], chunks[2]["id"]);
    assert_eq!(data[3], "[DONE]");
}

#[tokio::test]
async fn openai_errors_use_openai_shape() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app(backend.clone(), ServerConfig::default());
    let cases = [
        json!({"messages": [{"role": "user", "content": "the"}], "n": 2}),
        json!({"messages": []}),
        json!({"messages": [{"role": "user", "content": "the"}], "temperature": -1}),
        json!({"messages": [{"role": "user", "content": "the"}], "top_logprobs": 6, "logprobs": true}),
    ];
    for body in cases {
        let (status, response) = call_json(&app, post("/v1/chat/completions", body.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {response}");
        assert_eq!(response["error"]["type"], "invalid_request_error", "{body}: {response}");
        assert!(response["error"]["message"].is_string());
    }
    assert_eq!(backend.request_count(), 0);
}

#[tokio::test]
async fn completions_answer_one_choice_per_prompt() {
    let app = test_app(Arc::new(ScriptedBackend::new()), ServerConfig::default());
    let body = json!({"prompt": ["the", "the capital"], "max_tokens": 2, "echo": true, "logprobs": 1});
    let (status, response) = call_json(&app, post("/v1/completions", body)).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(response["object"], "text_completion");
    assert_eq!(response["choices"][1]["index"], 1);
    assert_eq!(response["choices"][1]["text"], "the capitalparis");
    assert_eq!(response["choices"][1]["logprobs"]["text_offset"][0], 11);
    assert_eq!(response["usage"]["prompt_tokens"], 3);

    let body = json!({"prompt": ["the", "the capital"], "max_tokens": 2, "stream": true});
    let (status, body) = call(&app, post("/v1/completions", body)).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks.len(), 4, "{body}");
    for index in [0, 1] {
        let texts: String = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == index)
            .map(|c| c["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, "paris");
    }
}

#[tokio::test]
async fn api_key_guards_generation_routes_only() {
    let config = ServerConfig { api_key: Some("secret".into()), ..Default::default() };
    let app = test_app(Arc::new(ScriptedBackend::new()), config);
    let (status, response) = call_json(&app, post("/generate", json!({"inputs": "the"}))).await;
    assert_eq!((status, response["error_type"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    let (status, response) = call_json(&app, post("/v1/completions", json!({"prompt": "the"}))).await;
    assert_eq!((status, response["error"]["type"].as_str()), (StatusCode::UNAUTHORIZED, Some("authentication_error")));
    let mut wrong = post("/generate", json!({"inputs": "the"}));
    wrong.headers_mut().insert(header::AUTHORIZATION, "Bearer secreT".parse().unwrap());
    assert_eq!(call(&app, wrong).await.0, StatusCode::UNAUTHORIZED);
    let mut right = post("/generate", json!({"inputs": "the"}));
    right.headers_mut().insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
    assert_eq!(call(&app, right).await.0, StatusCode::OK);
    for path in ["/health", "/info", "/metrics", "/openapi.json"] {
        assert_eq!(call(&app, Request::get(path).body(Body::empty()).unwrap()).await.0, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn info_tokenize_and_models() {
    let app = test_app(Arc::new(ScriptedBackend::new()), ServerConfig::default());
    let (_, info) = call_json(&app, Request::get("/info").body(Body::empty()).unwrap()).await;
    assert_eq!((info["model_id"].as_str(), info["max_total_tokens"].as_u64()), (Some("test-model"), Some(10)));
    let (status, tokens) = call_json(&app, post("/tokenize", json!({"inputs": "the capital"}))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        tokens,
        json!([{"id": 3, "text": "the", "start": 0, "stop": 3}, {"id": 4, "text": " capital", "start": 3, "stop": 11}])
    );
    let (_, models) = call_json(&app, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert_eq!(models["data"][0]["id"], "test-model");
}

#[tokio::test]
async fn dropping_the_response_cancels_the_generation() {
    let backend = Arc::new(ScriptedBackend { open_streams: Some(Mutex::default()), ..ScriptedBackend::new() });
    let app = test_app(backend.clone(), ServerConfig::default());
    let response = app.oneshot(post("/generate_stream", json!({"inputs": "the"}))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(backend.permits.available_permits(), 7);
    let sender = backend.open_streams.as_ref().unwrap().lock().unwrap()[0].clone();
    assert!(!sender.is_closed());
    drop(response);
    assert!(sender.is_closed(), "the stream outlived its response");
    assert_eq!(backend.permits.available_permits(), 8);
}

/// `body` with `field` set to `value`, at `pointer` (the object that holds the field).
fn with_field(mut body: Value, pointer: &str, field: &str, value: Value) -> Value {
    body.pointer_mut(pointer).unwrap().as_object_mut().unwrap().insert(field.to_string(), value);
    body
}

/// The error message of a body in either shape.
fn error_message(response: &Value) -> &str {
    response["error"].as_str().or(response["error"]["message"].as_str()).unwrap_or_default()
}

/// A valid body of each route that takes one.
fn valid_body(path: &str) -> Value {
    match path {
        "/v1/chat/completions" => {
            json!({"messages": [{"role": "user", "content": "the"}], "stream_options": {"include_usage": true}})
        }
        "/v1/completions" => json!({"prompt": "the"}),
        _ => json!({"inputs": "the", "parameters": {}}),
    }
}

#[tokio::test]
async fn unknown_fields_are_a_422_naming_them_on_every_route() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app(backend.clone(), ServerConfig::default());
    // Each route, and each object in its body that takes fields.
    let objects = [
        ("/generate", ""),
        ("/generate", "/parameters"),
        ("/generate_stream", "/parameters"),
        ("/", ""),
        ("/", "/parameters"),
        ("/tokenize", ""),
        ("/tokenize", "/parameters"),
        ("/v1/chat/completions", ""),
        ("/v1/chat/completions", "/messages/0"),
        ("/v1/chat/completions", "/stream_options"),
        ("/v1/completions", ""),
    ];
    for (path, pointer) in objects {
        let (status, response) = call(&app, post(path, valid_body(path))).await;
        assert_eq!(status, StatusCode::OK, "{path}: {response}");
        let body = with_field(valid_body(path), pointer, "frobnicate", json!(null));
        let (status, response) = call_json(&app, post(path, body.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {response}");
        assert!(error_message(&response).contains("unknown field `frobnicate`"), "{body}: {response}");
    }
    // The OpenAPI description says so too (schemathesis' negative mode then sends such fields).
    let schemas = &crate::http::openapi::document()["components"]["schemas"];
    for request in [
        "GenerateRequest",
        "GenerateParameters",
        "CompatGenerateRequest",
        "ChatCompletionRequest",
        "Message",
        "StreamOptions",
        "CompletionRequest",
    ] {
        assert_eq!(schemas[request]["additionalProperties"], json!(false), "{request}");
    }
}

/// (route, the object holding the field, field, a neutral value, a value that asks for something)
fn neutral_only_fields() -> Vec<(&'static str, &'static str, &'static str, Value, Value)> {
    let mut fields = vec![
        ("/v1/completions", "", "best_of", json!(1), json!(2)),
        ("/v1/completions", "", "suffix", json!(""), json!("!")),
    ];
    for path in ["/v1/chat/completions", "/v1/completions"] {
        fields.push((path, "", "logit_bias", json!({}), json!({"42": -100})));
    }
    for path in ["/generate", "/generate_stream", "/"] {
        fields.push((path, "/parameters", "adapter_id", json!(""), json!("my-lora")));
    }
    fields
}

#[tokio::test]
async fn unsupported_client_fields_pass_when_neutral_and_are_a_422_naming_them_otherwise() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app(backend.clone(), ServerConfig::default());
    for (path, pointer, field, neutral, asking) in neutral_only_fields() {
        for value in [json!(null), neutral] {
            let body = with_field(valid_body(path), pointer, field, value);
            let (status, response) = call(&app, post(path, body.clone())).await;
            assert_eq!(status, StatusCode::OK, "{path} {body}: {response}");
        }
        let body = with_field(valid_body(path), pointer, field, asking);
        let (status, response) = call_json(&app, post(path, body.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path} {body}: {response}");
        assert!(error_message(&response).contains(&format!("`{field}` is not supported")), "{body}: {response}");
    }
}

#[tokio::test]
async fn openai_model_and_user_are_accepted_and_ignored() {
    let app = test_app(Arc::new(ScriptedBackend::new()), ServerConfig::default());
    let chat = json!({"model": "gpt-4", "user": "u1", "messages": [{"role": "user", "content": "the"}]});
    let completion = json!({"model": "gpt-4", "user": "u1", "prompt": "the"});
    for (path, body) in [("/v1/chat/completions", chat), ("/v1/completions", completion)] {
        let (status, response) = call_json(&app, post(path, body)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {response}");
        assert_eq!(response["model"], "test-model");
    }
}

#[tokio::test]
async fn tgi_grammars_reach_inference_checked() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app_with_grammars(backend.clone());
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
    let cases = [
        (json!({"type": "json", "value": schema}), GrammarSpec::JsonSchema(schema.clone())),
        (json!({"type": "json", "value": schema.to_string()}), GrammarSpec::JsonSchema(schema.clone())),
        (json!({"type": "regex", "value": "[0-9]{3}"}), GrammarSpec::Regex("[0-9]{3}".into())),
    ];
    for path in ["/generate", "/generate_stream"] {
        for (grammar, spec) in &cases {
            let body = json!({"inputs": "the", "parameters": {"grammar": grammar}});
            let (status, response) = call(&app, post(path, body)).await;
            assert_eq!(status, StatusCode::OK, "{path} {grammar}: {response}");
            assert_eq!(backend.requests.lock().unwrap().last().unwrap().grammar.as_ref(), Some(spec));
        }
    }
}

#[tokio::test]
async fn bad_grammars_are_a_422_naming_the_problem() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app_with_grammars(backend.clone());
    let cases = [
        (json!({"type": "regex", "value": "(unclosed"}), "invalid grammar"),
        (json!({"type": "json", "value": {"type": "not-a-type"}}), "not-a-type"),
        (json!({"type": "json", "value": "{oops"}), "does not parse"),
        (json!({"type": "yaml", "value": "a: b"}), "unknown variant `yaml`"),
        (json!({"type": "regex"}), "missing field `value`"),
    ];
    for (grammar, expected) in cases {
        let body = json!({"inputs": "the", "parameters": {"grammar": grammar}});
        let (status, response) = call_json(&app, post("/generate", body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{grammar}: {response}");
        assert!(error_message(&response).contains(expected), "{grammar}: {response}");
    }
    assert_eq!(backend.request_count(), 0);
    // With --disable-grammar-support, any grammar is refused, saying why.
    let disabled = test_app(backend.clone(), ServerConfig::default());
    let body = json!({"inputs": "the", "parameters": {"grammar": {"type": "regex", "value": "a"}}});
    let (status, response) = call_json(&disabled, post("/generate", body)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error_message(&response).contains("--disable-grammar-support"), "{response}");
    assert_eq!(backend.request_count(), 0);
}

#[tokio::test]
async fn openai_response_formats_become_grammars() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app_with_grammars(backend.clone());
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    let cases = [
        (json!({"type": "text"}), None),
        (json!({"type": "json_object"}), Some(GrammarSpec::JsonSchema(json!({"type": "object"})))),
        (
            json!({"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": true}}),
            Some(GrammarSpec::JsonSchema(schema.clone())),
        ),
    ];
    for path in ["/v1/chat/completions", "/v1/completions"] {
        for (format, spec) in &cases {
            for stream in [false, true] {
                let body = with_field(valid_body(path), "", "response_format", format.clone());
                let body = with_field(body, "", "stream", json!(stream));
                let (status, response) = call(&app, post(path, body)).await;
                assert_eq!(status, StatusCode::OK, "{path} {format}: {response}");
                assert_eq!(backend.requests.lock().unwrap().last().unwrap().grammar, *spec, "{path} {format}");
            }
        }
        for (format, expected) in [
            (json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}), "wat"),
            (json!({"type": "json_schema", "json_schema": {"schema": {}}}), "missing field `name`"),
            (json!({"type": "yaml"}), "unknown variant `yaml`"),
        ] {
            let body = with_field(valid_body(path), "", "response_format", format.clone());
            let (status, response) = call_json(&app, post(path, body)).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path} {format}: {response}");
            assert!(error_message(&response).contains(expected), "{path} {format}: {response}");
        }
    }
}

#[tokio::test]
async fn tools_become_grammars_and_bad_tool_requests_are_a_422() {
    let backend = Arc::new(ScriptedBackend::new());
    let app = test_app_with_grammars(backend.clone());
    let weather = json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "the"}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let (status, response) = call(&app, post("/v1/chat/completions", chat(json!({"tools": [weather], "tool_choice": "required"})))).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    let Some(GrammarSpec::JsonSchema(schema)) = backend.requests.lock().unwrap().last().unwrap().grammar.clone() else {
        panic!("a JSON schema for `required`")
    };
    assert_eq!(schema["items"]["properties"]["name"], json!({"const": "get_weather"}));
    // `auto` compiles to the text-or-calls Lark grammar; `none` leaves the output free.
    let (status, response) = call(&app, post("/v1/chat/completions", chat(json!({"tools": [weather]})))).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert!(matches!(backend.requests.lock().unwrap().last().unwrap().grammar, Some(GrammarSpec::Lark(_))));
    let (status, _) = call(&app, post("/v1/chat/completions", chat(json!({"tools": [weather], "tool_choice": "none"})))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backend.requests.lock().unwrap().last().unwrap().grammar, None);
    // A history with a call and its result.
    let history = json!({"messages": [
        {"role": "user", "content": "the"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    ], "tools": [weather]});
    let (status, response) = call(&app, post("/v1/chat/completions", history)).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    let count = backend.request_count();
    for (extra, expected) in [
        (json!({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "`nope`"),
        (json!({"tool_choice": "required"}), "`tool_choice` needs `tools`"),
        (json!({"tools": [weather], "n": 2}), "`n`"),
        (json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}]}), "object"),
        (json!({"tools": [{"type": "retrieval"}]}), "unknown variant `retrieval`"),
        (json!({"tool_choice": "sometimes", "tools": [weather]}), "tool_choice"),
    ] {
        let (status, response) = call_json(&app, post("/v1/chat/completions", chat(extra.clone()))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{extra}: {response}");
        assert!(error_message(&response).contains(expected), "{extra}: {response}");
    }
    let no_content = json!({"messages": [{"role": "user", "content": null}]});
    let (status, response) = call_json(&app, post("/v1/chat/completions", no_content)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{response}");
    assert_eq!(backend.request_count(), count);
}
