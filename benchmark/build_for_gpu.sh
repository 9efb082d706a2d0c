#!/usr/bin/env bash
# Builds the four binaries for the GPU machine (CUDA 13, H100 = sm_90) on this machine,
# which has no GPU, into target-cuda/, copies them into .bin/, and packs them into
# .gpu-carry/bins.tar.xz (what a GPU run carries: 64 MiB at most, the binaries alone are
# ~200 MB); benchmark/run_gpu.sh unpacks it. Also extracts the benchmark's tokenizer into
# .bench-assets/ (the GPU machine has no npm).
#
#   benchmark/build_for_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${SHARED_DIR:-$(cd .. && pwd)/shared}"
# shellcheck source=/dev/null
source "$shared/cuda/toolchain.sh"

binaries=(text-generation-launcher text-generation-shard text-generation-router text-generation-benchmark)
packages=()
for binary in "${binaries[@]}"; do packages+=(-p "$binary"); done
cargo build --release --target-dir target-cuda "${packages[@]}" --features text-generation-shard/cuda

mkdir -p .bin
for binary in "${binaries[@]}"; do
    cp "target-cuda/release/$binary" .bin/
    # Symbols are dead weight on the GPU machine, and what a run carries is capped (64 MiB).
    strip ".bin/$binary"
done
mkdir -p .gpu-carry
tar cf - -C .bin "${binaries[@]}" | xz -T0 -6 > .gpu-carry/bins.tar.xz
benchmark/fetch_tokenizer.sh
du -ch .gpu-carry .bench-assets | tail -n 1 | sed 's/^/build_for_gpu.sh: to carry (64 MiB at most): /' >&2
echo "build_for_gpu.sh: ${binaries[*]} in .bin/ and packed in .gpu-carry/; tokenizer in .bench-assets/" >&2
