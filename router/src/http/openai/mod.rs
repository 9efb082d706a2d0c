//! OpenAI-compatible routes: they translate requests into TGI's parameters, go
//! through the same validation and inference, and answer in OpenAI's shapes.

pub mod chat;
pub mod completions;

use crate::api::generate::GenerateParameters;
use crate::api::openai::{ModelCard, ModelList, OneOrMany, OpenAiResponse, Usage};
use crate::http::openapi::OpenAiErrors;
use crate::http::server::AppState;
use crate::validation::{check_top_p, ValidationError};
use axum::extract::State;
use axum::response::sse::Event;
use axum::Json;
use std::time::{SystemTime, UNIX_EPOCH};

/// The sampling fields chat and completion requests share.
pub struct OpenAiSampling {
    pub n: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    pub max_tokens: Option<u32>,
    pub top_n_tokens: Option<u32>,
    pub ignore_eos: bool,
}

impl OpenAiSampling {
    pub fn into_parameters(self) -> Result<GenerateParameters, ValidationError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ValidationError::OutOfRange { name: "n", expected: "1 (several choices are not supported)" });
        }
        // OpenAI samples unless the temperature is 0, which means greedy (and top_p unused, but checked).
        let greedy = self.temperature == Some(0.0);
        check_top_p(self.top_p)?;
        Ok(GenerateParameters {
            do_sample: !greedy,
            temperature: self.temperature.filter(|_| !greedy),
            top_p: self.top_p.filter(|_| !greedy),
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
            stop: self.stop.map(OneOrMany::into_vec).unwrap_or_default(),
            max_new_tokens: self.max_tokens,
            top_n_tokens: self.top_n_tokens,
            ignore_eos: self.ignore_eos,
            ..GenerateParameters::default()
        })
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
            frequency_penalty: None,
            presence_penalty: None,
            seed: None,
            stop: Some(OneOrMany::One("\n".into())),
            max_tokens: None,
            top_n_tokens: None,
            ignore_eos: true,
        }
    }

    #[test]
    fn ignore_eos_reaches_the_parameters() {
        assert!(sampling(Some(0.0), None).into_parameters().unwrap().ignore_eos);
    }

    #[test]
    fn temperature_zero_is_greedy_and_unset_samples() {
        let greedy = sampling(Some(0.0), None).into_parameters().unwrap();
        assert!(!greedy.do_sample);
        assert_eq!((greedy.temperature, greedy.top_p), (None, None));
        let sampled = sampling(None, Some(1)).into_parameters().unwrap();
        assert!(sampled.do_sample);
        assert_eq!(sampled.top_p, Some(0.9));
        assert_eq!(sampled.stop, vec!["\n".to_string()]);
        // Unset max_tokens: the rest of the context (not the native routes' 100).
        assert_eq!(sampled.max_new_tokens, None);
    }

    #[test]
    fn greedy_still_checks_top_p() {
        let mut request = sampling(Some(0.0), None);
        request.top_p = Some(0.0);
        assert!(matches!(request.into_parameters(), Err(ValidationError::OutOfRange { name: "top_p", .. })));
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
                "frequency_penalty",
                "presence_penalty",
                "n",
                "seed",
                "stop",
                "ignore_eos",
                "stream",
                "stream_options",
            ] {
                assert!(properties[field].is_object(), "{request}.{field}");
            }
        }
    }

    #[test]
    fn only_one_choice() {
        assert!(matches!(
            sampling(None, Some(2)).into_parameters(),
            Err(ValidationError::OutOfRange { name: "n", .. })
        ));
    }
}
