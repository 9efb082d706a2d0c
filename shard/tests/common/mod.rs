//! What the shard's integration tests share.

use std::path::PathBuf;

/// The default model's GGUF (`scripts/fetch-default-model.sh`), or `SHARD_GGUF`.
pub fn smollm2_gguf() -> PathBuf {
    let path = std::env::var("SHARD_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "SmolLM2 GGUF {} missing: run scripts/fetch-default-model.sh or set SHARD_GGUF",
        path.display()
    );
    path
}
