//! The building blocks of the Llama-family models, each written once and loaded from
//! checkpoint prefixes so names mirror the checkpoint (`...self_attn.q_proj`).

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rotary;
