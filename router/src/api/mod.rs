//! Request and response bodies of the HTTP API (serde + OpenAPI schemas).

pub mod generate;
pub mod openai;
