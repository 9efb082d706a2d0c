#!/usr/bin/env bash
# Builds the server and serves the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) on
# http://localhost:8080 (override with PORT=...). Extra arguments go to the launcher,
# e.g. `./scripts/serve.sh --max-batch-size 8`.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(./scripts/fetch-default-model.sh)
cargo build --release
exec target/release/text-generation-launcher --model-id "$model" --hostname 0.0.0.0 --port "${PORT:-8080}" "$@"
