#!/usr/bin/env bash
# Runs every test: the shard's reference fixtures, the unit and model-correctness
# tests (cargo), then the end-to-end suite (pytest against the real launcher).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-default-model.sh >/dev/null

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r integration-tests/requirements.txt

# Reference outputs the shard's model tests compare against, computed in Python.
export SHARD_FIXTURES="$PWD/target/shard-fixtures"
.venv/bin/python shard/reference/make_fixtures.py "$SHARD_FIXTURES"

cargo build --release --workspace
cargo test --release --workspace
# The CUDA build type-checks and its kernels compile (nvcc to PTX), though no GPU here
# runs them: NVIDIA's toolchain from shared/cuda (pip wheels, installed once into
# ~/.cache), and a target dir kept between runs on the same machine.
(
    # shellcheck source=/dev/null
    source ../shared/cuda/toolchain.sh
    cargo check --all-targets -p text-generation-shard -p text-generation-kernels \
        --features text-generation-shard/cuda,text-generation-shard/nccl,text-generation-kernels/cuda \
        --target-dir "${CUDA_CHECK_TARGET_DIR:-$HOME/.cache/text-generation-cuda-check}"
)
# Deployment files (manifests, Prometheus config and rules, dashboard), then a real
# Prometheus scraping the real router.
deploy/check.sh
deploy/prometheus_e2e.sh --launch models/SmolLM2-135M-Instruct
# Separate runs: each directory has its own conftest.py. No .pytest_cache in the checkout.
.venv/bin/python -m pytest -p no:cacheprovider integration-tests -v
.venv/bin/python -m pytest -p no:cacheprovider benchmark/tests -q
