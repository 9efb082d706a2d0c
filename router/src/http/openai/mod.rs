//! OpenAI-compatible routes: they translate requests into TGI's parameters, go
//! through the same validation and inference, and answer in OpenAI's shapes.

pub mod chat;
pub mod completions;
pub mod tools;

use crate::api::generate::{GenerateParameters, GrammarParameter};
use crate::api::openai::{ModelCard, ModelList, OneOrMany, OpenAiResponse, Usage};
use crate::http::openapi::OpenAiErrors;
use crate::http::server::AppState;
use crate::validation::{check_warpers, ValidationError};
use axum::extract::State;
use axum::response::sse::Event;
use axum::Json;
use model_store::SamplingDefaults;
use std::time::{SystemTime, UNIX_EPOCH};

/// The sampling fields chat and completion requests share.
pub struct OpenAiSampling {
    pub n: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    pub max_tokens: Option<u32>,
    pub top_n_tokens: Option<u32>,
    pub ignore_eos: bool,
    /// From `response_format`.
    pub grammar: Option<GrammarParameter>,
}

impl OpenAiSampling {
    /// As vLLM's server does, the model's `defaults` stand in for the unset fields of every
    /// request, greedy or not (a greedy one keeps only the repetition penalty of them).
    pub fn into_parameters(self, defaults: &SamplingDefaults) -> Result<GenerateParameters, ValidationError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ValidationError::OutOfRange { name: "n", expected: "1 (several choices are not supported)" });
        }
        // vLLM's "no top-k" values (a request's own -1 overrides the model's top-k); TGI's
        // parameters leave it unset instead.
        let top_k = match self.top_k.or(defaults.top_k) {
            Some(-1 | 0) => None,
            Some(k) if k < -1 => {
                return Err(ValidationError::OutOfRange { name: "top_k", expected: "-1 or 0 (disabled), or at least 1" })
            }
            top_k => top_k,
        };
        let sampled = GenerateParameters {
            // OpenAI samples unless the temperature is 0 (greedy).
            do_sample: true,
            temperature: self.temperature.or(defaults.temperature),
            top_p: self.top_p.or(defaults.top_p),
            top_k,
            min_p: self.min_p.or(defaults.min_p),
            repetition_penalty: self.repetition_penalty.or(defaults.repetition_penalty),
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
            stop: self.stop.map(OneOrMany::into_vec).unwrap_or_default(),
            max_new_tokens: self.max_tokens,
            top_n_tokens: self.top_n_tokens,
            ignore_eos: self.ignore_eos,
            grammar: self.grammar,
            ..GenerateParameters::default()
        };
        if self.temperature != Some(0.0) {
            return Ok(sampled);
        }
        // Greedy: the warpers do not apply, but values out of range are still errors.
        check_warpers(&sampled)?;
        Ok(GenerateParameters { do_sample: false, temperature: None, top_p: None, top_k: None, min_p: None, ..sampled })
    }
}

/// What every response and chunk of one request shares.
pub struct ResponseContext {
    id: String,
    created: u64,
    model: String,
    system_fingerprint: String,
}

impl ResponseContext {
    /// `prefix`: `chatcmpl` or `cmpl`, as OpenAI's ids start.
    pub fn new(state: &AppState, prefix: &str) -> Self {
        Self {
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            model: state.info.model_id.clone(),
            system_fingerprint: format!("{}-{}", state.info.version, state.info.model_dtype),
        }
    }

    pub fn response<C>(&self, object: &'static str, choices: Vec<C>, usage: Option<Usage>) -> OpenAiResponse<C> {
        OpenAiResponse {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.system_fingerprint.clone(),
            choices,
            usage,
        }
    }
}

/// The end of an OpenAI stream: the usage chunk when asked for, then `[DONE]`.
pub fn stream_end<C: serde::Serialize>(
    context: &ResponseContext,
    object: &'static str,
    usage: Option<Usage>,
) -> Vec<Event> {
    let usage_chunk = usage.map(|usage| super::stream::json_event(&context.response::<C>(object, vec![], Some(usage))));
    usage_chunk.into_iter().chain([Event::default().data("[DONE]")]).collect()
}

/// The served model.
#[utoipa::path(get, path = "/v1/models", tag = "OpenAI",
    responses((status = 200, description = "The served model", body = ModelList), OpenAiErrors))]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.info.model_id.clone(),
            object: "model",
            created: 0,
            owned_by: "text-generation-inference",
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::openai::{ChatCompletionRequest, CompletionRequest};
    use crate::api::Object;

    fn sampling(temperature: Option<f32>, n: Option<u32>) -> OpenAiSampling {
        OpenAiSampling {
            n,
            temperature,
            top_p: Some(0.9),
            top_k: None,
            min_p: None,
            repetition_penalty: None,
            frequency_penalty: None,
            presence_penalty: None,
            seed: None,
            stop: Some(OneOrMany::One("\n".into())),
            max_tokens: None,
            top_n_tokens: None,
            ignore_eos: true,
            grammar: None,
        }
    }

    #[test]
    fn ignore_eos_reaches_the_parameters() {
        assert!(sampling(Some(0.0), None).into_parameters(&SamplingDefaults::default()).unwrap().ignore_eos);
    }

    #[test]
    fn temperature_zero_is_greedy_and_unset_samples() {
        let greedy = sampling(Some(0.0), None).into_parameters(&SamplingDefaults::default()).unwrap();
        assert!(!greedy.do_sample);
        assert_eq!((greedy.temperature, greedy.top_p), (None, None));
        let sampled = sampling(None, Some(1)).into_parameters(&SamplingDefaults::default()).unwrap();
        assert!(sampled.do_sample);
        assert_eq!(sampled.top_p, Some(0.9));
        assert_eq!(sampled.stop, vec!["\n".to_string()]);
        // Unset max_tokens: the rest of the context (not the native routes' 100).
        assert_eq!(sampled.max_new_tokens, None);
    }

    #[test]
    fn greedy_still_checks_the_warpers() {
        let out_of_range = |edit: fn(&mut OpenAiSampling)| {
            let mut request = sampling(Some(0.0), None);
            edit(&mut request);
            match request.into_parameters(&SamplingDefaults::default()) {
                Err(ValidationError::OutOfRange { name, .. }) => name,
                other => panic!("expected OutOfRange, got {other:?}"),
            }
        };
        assert_eq!(out_of_range(|r| r.top_p = Some(0.0)), "top_p");
        assert_eq!(out_of_range(|r| r.min_p = Some(1.5)), "min_p");
        assert_eq!(out_of_range(|r| r.top_k = Some(-2)), "top_k");
    }

    #[test]
    fn vllm_extra_fields_reach_the_parameters() {
        let mut request = sampling(None, None);
        (request.top_k, request.min_p, request.repetition_penalty) = (Some(50), Some(0.1), Some(1.1));
        let parameters = request.into_parameters(&SamplingDefaults::default()).unwrap();
        assert_eq!((parameters.top_k, parameters.min_p, parameters.repetition_penalty), (Some(50), Some(0.1), Some(1.1)));
        // Greedy drops the warpers but keeps the penalty, which applies to greedy decoding too.
        let mut request = sampling(Some(0.0), None);
        (request.top_k, request.min_p, request.repetition_penalty) = (Some(50), Some(0.1), Some(1.1));
        let parameters = request.into_parameters(&SamplingDefaults::default()).unwrap();
        assert_eq!((parameters.top_k, parameters.min_p, parameters.repetition_penalty), (None, None, Some(1.1)));
        for disabled in [-1, 0] {
            let mut request = sampling(None, None);
            request.top_k = Some(disabled);
            assert_eq!(request.into_parameters(&SamplingDefaults::default()).unwrap().top_k, None);
        }
    }

    #[test]
    fn model_defaults_fill_every_unset_field_as_in_vllm() {
        let defaults = SamplingDefaults {
            temperature: Some(0.7),
            top_p: Some(0.8),
            top_k: Some(20),
            min_p: None,
            repetition_penalty: Some(1.05),
        };
        // The helper's request sets top_p 0.9 itself.
        let p = sampling(None, None).into_parameters(&defaults).unwrap();
        assert!(p.do_sample);
        assert_eq!((p.temperature, p.top_p, p.top_k, p.repetition_penalty), (Some(0.7), Some(0.9), Some(20), Some(1.05)));
        // A request's own "no top-k" wins over the model's.
        let mut request = sampling(None, None);
        request.top_k = Some(-1);
        assert_eq!(request.into_parameters(&defaults).unwrap().top_k, None);
        // Greedy: of the defaults, only the repetition penalty applies.
        let p = sampling(Some(0.0), None).into_parameters(&defaults).unwrap();
        assert!(!p.do_sample);
        assert_eq!((p.temperature, p.top_p, p.top_k, p.repetition_penalty), (None, None, None, Some(1.05)));
    }

    /// The shared fields stay plain fields of both requests (no `#[serde(flatten)]`):
    /// errors name them, and the schemas list them as the requests' own properties.
    #[test]
    fn shared_fields_are_plain_fields_of_both_requests() {
        let chat = r#"{"messages": [{"role": "user", "content": "hi"}], "seed": -1}"#;
        let error = Json::<Object<ChatCompletionRequest>>::from_bytes(chat.as_bytes()).unwrap_err().body_text();
        assert!(error.ends_with("seed: invalid value: integer `-1`, expected u64 at line 1 column 60"), "{error}");
        let completion = r#"{"prompt": "hi", "seed": -1}"#;
        let error = Json::<Object<CompletionRequest>>::from_bytes(completion.as_bytes()).unwrap_err().body_text();
        assert!(error.ends_with("seed: invalid value: integer `-1`, expected u64 at line 1 column 27"), "{error}");
        let doc = crate::http::openapi::document();
        for request in ["ChatCompletionRequest", "CompletionRequest"] {
            let properties = &doc["components"]["schemas"][request]["properties"];
            for field in [
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "repetition_penalty",
                "frequency_penalty",
                "presence_penalty",
                "n",
                "seed",
                "stop",
                "ignore_eos",
                "stream",
                "stream_options",
                "response_format",
            ] {
                assert!(properties[field].is_object(), "{request}.{field}");
            }
        }
    }

    #[test]
    fn only_one_choice() {
        assert!(matches!(
            sampling(None, Some(2)).into_parameters(&SamplingDefaults::default()),
            Err(ValidationError::OutOfRange { name: "n", .. })
        ));
    }
}
