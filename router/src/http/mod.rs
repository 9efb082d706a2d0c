//! The HTTP server: one file per API, the app and its middleware in `server`.

pub mod backend;
pub mod generate;
pub mod info;
pub mod listener;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod server;
pub mod stream;
pub mod tokenize;

#[cfg(test)]
pub(crate) mod tests;
