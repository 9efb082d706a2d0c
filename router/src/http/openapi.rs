//! `GET /openapi.json`: the OpenAPI description, generated from the same types
//! the routes deserialize, so that it cannot drift from what the server accepts.

use crate::api::generate::ErrorResponse;
use crate::api::openai::{OpenAiErrorDetail, OpenAiErrorResponse};
use crate::http::{generate, info, metrics, openai, tokenize};
use axum::Json;
use serde_json::{json, Value};
use std::sync::LazyLock;
use utoipa::{IntoResponses, OpenApi};

/// The errors of the native routes.
#[derive(IntoResponses)]
#[allow(dead_code)] // Only its OpenAPI description is used.
pub enum TgiErrors {
    #[response(status = 400, description = "Malformed JSON")]
    MalformedJson(#[to_schema] ErrorResponse),
    #[response(status = 401, description = "Missing or wrong API key")]
    Unauthorized(#[to_schema] ErrorResponse),
    #[response(status = 413, description = "Payload too large")]
    PayloadTooLarge(#[to_schema] ErrorResponse),
    #[response(status = 415, description = "Not a JSON body")]
    UnsupportedMediaType(#[to_schema] ErrorResponse),
    #[response(status = 422, description = "Input validation error")]
    Validation(#[to_schema] ErrorResponse),
    #[response(status = 424, description = "Generation error")]
    Generation(#[to_schema] ErrorResponse),
    #[response(status = 429, description = "Model is overloaded")]
    Overloaded(#[to_schema] ErrorResponse),
    #[response(status = 500, description = "Incomplete generation")]
    Incomplete(#[to_schema] ErrorResponse),
}

/// The errors of the OpenAI routes.
#[derive(IntoResponses)]
#[allow(dead_code)] // Only its OpenAPI description is used.
pub enum OpenAiErrors {
    #[response(status = 400, description = "Malformed JSON")]
    MalformedJson(#[to_schema] OpenAiErrorResponse),
    #[response(status = 401, description = "Missing or wrong API key")]
    Unauthorized(#[to_schema] OpenAiErrorResponse),
    #[response(status = 413, description = "Payload too large")]
    PayloadTooLarge(#[to_schema] OpenAiErrorResponse),
    #[response(status = 415, description = "Not a JSON body")]
    UnsupportedMediaType(#[to_schema] OpenAiErrorResponse),
    #[response(status = 422, description = "Input validation error")]
    Validation(#[to_schema] OpenAiErrorResponse),
    #[response(status = 424, description = "Generation error")]
    Generation(#[to_schema] OpenAiErrorResponse),
    #[response(status = 429, description = "Model is overloaded")]
    Overloaded(#[to_schema] OpenAiErrorResponse),
    #[response(status = 500, description = "Incomplete generation")]
    Incomplete(#[to_schema] OpenAiErrorResponse),
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Text Generation Inference", description = "TGI- and OpenAI-compatible text generation API"),
    paths(
        generate::generate,
        generate::generate_stream,
        generate::compat_generate,
        tokenize::tokenize,
        info::info,
        info::health,
        openai::chat::chat_completions,
        openai::completions::completions,
        openai::models,
        metrics::render,
        openapi_json,
    ),
    // Referenced from the inlined error bodies.
    components(schemas(OpenAiErrorDetail)),
    tags((name = "Text Generation Inference"), (name = "OpenAI"), (name = "Server"))
)]
pub struct ApiDoc;

/// The description, with each `text/event-stream` body described as its events:
/// an object whose `data` is the JSON of the generated schema (OpenAPI 3.1 has no
/// notion of a stream of items, and fuzzers check each event against the schema).
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let operations = doc["paths"].as_object_mut().into_iter().flat_map(|paths| paths.values_mut());
    for operation in operations.flat_map(|path| path.as_object_mut().into_iter().flat_map(|ops| ops.values_mut())) {
        let Some(responses) = operation["responses"].as_object_mut() else {
            continue;
        };
        for response in responses.values_mut() {
            if let Some(sse) = response.pointer_mut("/content/text~1event-stream/schema") {
                *sse = json!({
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": sse.take()},
                        "event": {"type": "string"},
                        "id": {"type": "string"},
                        "retry": {"type": "integer", "minimum": 0}
                    }
                });
            }
        }
    }
    doc
}

static DOCUMENT: LazyLock<Value> = LazyLock::new(document);

/// This description.
#[utoipa::path(get, path = "/openapi.json", tag = "Server",
    responses((status = 200, description = "OpenAPI 3 description", content_type = "application/json")))]
pub async fn openapi_json() -> Json<&'static Value> {
    Json(&DOCUMENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_every_route_with_its_schemas() {
        let doc = document();
        for path in [
            "/generate",
            "/generate_stream",
            "/",
            "/tokenize",
            "/info",
            "/health",
            "/metrics",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
            "/openapi.json",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        let schemas = &doc["components"]["schemas"];
        for schema in
            ["GenerateRequest", "GenerateParameters", "ChatCompletionRequest", "CompletionRequest", "ErrorResponse"]
        {
            assert!(schemas[schema].is_object(), "{schema} missing");
        }
        // Structured output and tools.
        for schema in ["GrammarParameter", "ResponseFormat", "Tool", "ToolChoice", "ToolCall", "ToolCallDelta", "AssistantDelta"] {
            assert!(schemas[schema].is_object(), "{schema} missing");
        }
        let chat_request = &schemas["ChatCompletionRequest"]["properties"];
        for field in ["tools", "tool_choice", "parallel_tool_calls", "response_format"] {
            assert!(chat_request[field].is_object(), "ChatCompletionRequest.{field}");
        }
        assert!(schemas["CompletionRequest"]["properties"]["response_format"].is_object());
        let min_p = &schemas["GenerateParameters"]["properties"]["min_p"];
        assert_eq!((min_p["minimum"].as_f64(), min_p["maximum"].as_f64()), (Some(0.0), Some(1.0)), "{min_p}");
        assert!(schemas["Info"]["properties"]["generation_defaults"].is_object());
        let error = &doc["paths"]["/generate"]["post"]["responses"]["422"]["content"]["application/json"]["schema"];
        assert!(error["properties"]["error_type"].is_object(), "{error}");
        let chat = &doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"];
        assert_eq!(chat["application/json"]["schema"]["$ref"], "#/components/schemas/OpenAiResponse_ChatChoice");
        assert_eq!(
            chat["text/event-stream"]["schema"]["properties"]["data"]["contentSchema"]["$ref"],
            "#/components/schemas/OpenAiResponse_ChatChunkChoice"
        );
        // Every reference resolves.
        let text = doc.to_string();
        for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &reference[..reference.find('"').unwrap()];
            assert!(schemas[name].is_object(), "dangling reference to {name}");
        }
    }
}
