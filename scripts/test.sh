#!/usr/bin/env bash
# Runs every test: unit and model-correctness tests (cargo), then the end-to-end suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-default-model.sh >/dev/null
cargo test --workspace --release 2>&1
