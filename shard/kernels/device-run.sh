#!/usr/bin/env bash
# Checks and times the kernels on a GPU machine, from the repository root.
#   shard/kernels/device-run.sh pack   # here: build the test and bench binaries with
#                                      # CUDA, pack them into .bin/kernels/ (ignored)
#   shard/kernels/device-run.sh        # there (`run` tool, carry .bin/kernels):
#                                      # every kernel test, the shard's device sampler
#                                      # tests (against its host sampler), then the
#                                      # timing table
#   shard/kernels/device-run.sh profile  # there: Nsight Compute reports first
# Logs go to $OUT when set.
set -o pipefail
pack=.bin/kernels/kernels.tar.xz
if [ "$1" = pack ]; then
  source /work/shared/cuda/toolchain.sh || exit 1
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
  test_bin=$(cargo test --release --features cuda -p text-generation-kernels --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*/kernels-[^"]*"' | cut -d'"' -f4) || exit 1
  shard_test_bin=$(cargo test --release --features cuda -p text-generation-shard --lib --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*/text_generation_shard-[^"]*"' | cut -d'"' -f4) || exit 1
  cargo build --release --features cuda -p text-generation-kernels --example bench_kernels || exit 1
  dir=$(mktemp -d)
  cp "$test_bin" "$dir/kernels_test" && cp "$shard_test_bin" "$dir/shard_test" \
    && cp "$CARGO_TARGET_DIR/release/examples/bench_kernels" "$dir/" || exit 1
  [ -n "$KERNELS_NVCC_FLAGS" ] && pack=.bin/kernels/variant-$(echo "$KERNELS_NVCC_FLAGS" | tr -c 'A-Za-z0-9=_\n' _).tar.xz
  strip "$dir"/* && mkdir -p .bin/kernels && tar cJf "$pack" -C "$dir" kernels_test shard_test bench_kernels
  rm -r "$dir"
  ls -la "$pack"
  exit
fi
dir=$(mktemp -d)
tar xJf "$pack" -C "$dir" || exit 1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu:$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib 2>/dev/null | tr '\n' :)
out=${OUT:-$dir}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv | tee "$out/gpu.txt"
if [ "$1" = profile ]; then
  # Stall reasons and throughput of one launch of each attention kernel.
  for k in ${PROFILE_KERNELS:-decode prefill}; do
    ncu --kernel-name "regex:paged_attention_${k}_bf16" --launch-skip 4 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis --section LaunchStats "$dir/bench_kernels" "$k" > "$out/ncu-$k.txt" 2>&1
    grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issued Warp|Stall|Block Limit|One or More|No Eligible" "$out/ncu-$k.txt" | head -40
  done
fi
"$dir/kernels_test" --test-threads=1 2>&1 | tee "$out/tests.log"
tests=$?
"$dir/shard_test" --test-threads=1 sampler 2>&1 | tee -a "$out/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || tests=1
"$dir/bench_kernels" $BENCH_FILTER 2>&1 | tee "$out/bench.log"
bench=$?
# Variant builds packed next to the main one (KERNELS_NVCC_FLAGS experiments).
for variant in .bin/kernels/variant-*.tar.xz; do
  [ -e "$variant" ] || continue
  vdir=$(mktemp -d) && tar xJf "$variant" -C "$vdir" || continue
  echo "== $(basename "$variant" .tar.xz)"
  "$vdir/kernels_test" --test-threads=1 2>&1 | grep -E "^test |test result"
  "$vdir/bench_kernels" prefill 2>&1
done
echo "tests exit $tests, bench exit $bench"
