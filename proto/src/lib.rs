//! The router <-> shard gRPC protocol (`generate.proto`), generated at build time.
pub mod v3 {
    tonic::include_proto!("generate.v3");
}
pub use v3::*;

impl v3::NextTokenChooserParameters {
    /// Greedy decoding with every processor disabled (the protocol's neutral values:
    /// proto3's zero default would mean temperature 0 and top_p 0).
    pub fn greedy() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            min_p: 0.0,
            grammar: String::new(),
            grammar_type: v3::GrammarType::None as i32,
        }
    }
}
