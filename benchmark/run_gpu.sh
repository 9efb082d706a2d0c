#!/usr/bin/env bash
# The whole GPU benchmark, run ON THE GPU MACHINE from the repository root, with the
# binaries that benchmark/build_for_gpu.sh packed into .gpu-carry/ and the tokenizer it put
# into .bench-assets/ (carry both):
#   1. writes a random Llama-3.1-8B-shaped bf16 model to $MODEL_DIR (once),
#   2. starts the launcher on it and waits for /health,
#   3. runs benchmark/load.py: the issue's scenarios, then the concurrency sweep (greedy),
#      and with STEPS including "sampling" the sampling sweep (every load.py --sampling
#      preset at 1, 64 and 256 streams beside greedy: about a minute on an 8B model when
#      sampled requests run at greedy's speed, several per preset when they do not), and
#      with STEPS including "prefix" the prefix caching scenarios (32 streams sharing a
#      1,536-token system prompt, multi-turn chats: load.py --prefix-scenarios),
#   4. stops the launcher, runs the shard microbenchmark on a shard of its own,
#   5. prints the tables, and copies the JSON results and logs to $OUT when set.
#
#   benchmark/run_gpu.sh
# Environment: PRESET (llama-3.1-8b | llama-3.1-70b | tiny), QUANTIZE (awq | gptq | fp8: the
# random model's linear layers packed in that format, which the shards detect from its
# config.json), MODEL_DIR, DTYPE (bfloat16), PORT, RESULTS_DIR,
# CONCURRENCY (sweep levels, e.g. 1,8,32), SAMPLING_PRESETS (presets of the sampling
# step, e.g. greedy,t0.7-p0.9), SHARD_BENCH_ARGS, and STEPS, the parts to run
# (default "scenario sweep shard"; "sampling" only when named): to stay under a time
# limit per command, run STEPS=scenario, then STEPS=sweep, then STEPS=shard, then
# STEPS=sampling ("tp-one-gpu": two shards on one GPU against one, greedy; "prefix": the
# prefix caching scenarios; only when named); the model and the results of earlier steps stay in /tmp while the
# machine does, and every table so far is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

PRESET="${PRESET:-llama-3.1-8b}"
QUANTIZE="${QUANTIZE:-}"
# One folder per preset and format: an existing model is reused, so they must not share one.
case "$PRESET" in
    llama-3.1-8b) MODEL_DIR="${MODEL_DIR:-/tmp/llama-8b-random${QUANTIZE:+-$QUANTIZE}}" ;;
    *) MODEL_DIR="${MODEL_DIR:-/tmp/llama-$PRESET-random${QUANTIZE:+-$QUANTIZE}}" ;;
esac
DTYPE="${DTYPE:-bfloat16}"
PORT="${PORT:-8080}"
RESULTS_DIR="${RESULTS_DIR:-/tmp/bench-results}"
CONCURRENCY="${CONCURRENCY:-1,8,32,64,128,256}"
STEPS="${STEPS:-scenario sweep shard}"
SHARD_UDS="/tmp/bench-shard"
# The router's limits, the same for the launcher and the shard microbenchmark.
LIMITS=(--max-input-tokens 2048 --max-total-tokens 4096 --max-batch-prefill-tokens 8192)

export PATH="$PWD/.bin:$PATH"
# Where the GPU machine's image keeps the CUDA runtime libraries the binaries link to
# (what shared/cuda/device-env.sh sets, for runs that do not carry shared/).
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The binaries travel packed (benchmark/build_for_gpu.sh); a newer pack replaces them.
if [ -f .gpu-carry/bins.tar.xz ] && [ .gpu-carry/bins.tar.xz -nt .bin/text-generation-shard ]; then
    mkdir -p .bin && tar xJf .gpu-carry/bins.tar.xz -C .bin && touch .bin/text-generation-*
fi
for binary in text-generation-launcher text-generation-shard text-generation-router text-generation-benchmark; do
    [ -x ".bin/$binary" ] || { echo "run_gpu.sh: .bin/$binary is missing: run benchmark/build_for_gpu.sh first" >&2; exit 1; }
done
mkdir -p "$RESULTS_DIR"

server_pid=""
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        # The launcher stops its children on SIGTERM; give it time before forcing.
        for _ in $(seq 60); do kill -0 "$server_pid" 2>/dev/null || break; sleep 1; done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
collect() {
    stop_server
    if [ -n "${OUT:-}" ]; then cp -r "$RESULTS_DIR"/. "$OUT"/ 2>/dev/null || true; fi
}
trap collect EXIT

# Waits until `check` succeeds, failing early when the server process has exited.
wait_for() {
    local what="$1" timeout="$2" log="$3"; shift 3
    local started=$SECONDS
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "run_gpu.sh: the process exited before $what; last lines of $log:" >&2
            tail -n 40 "$log" >&2
            exit 1
        fi
        if (( SECONDS - started > timeout )); then
            echo "run_gpu.sh: no $what after ${timeout}s; last lines of $log:" >&2
            tail -n 40 "$log" >&2
            exit 1
        fi
        sleep 2
    done
    echo "run_gpu.sh: $what after $((SECONDS - started))s" >&2
}

# Prints the body of a GET; fails on a connection error or an HTTP error status.
http_get() {
    python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())" "$1"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$RESULTS_DIR/gpu.txt" 2>/dev/null \
    || echo "no GPU: nvidia-smi failed" >"$RESULTS_DIR/gpu.txt"
cat "$RESULTS_DIR/gpu.txt"

if [ ! -f "$MODEL_DIR/model.safetensors.index.json" ]; then
    python3 benchmark/make_random_model.py "$MODEL_DIR" --preset "$PRESET" ${QUANTIZE:+--quantize "$QUANTIZE"}
fi

has_step() { [[ " $STEPS " == *" $1 "* ]]; }
status=0
# Runs one step, `tee`ing its table into $RESULTS_DIR/<step>.md; a failure is remembered,
# not fatal, so the other steps still run.
run_step() {
    local step="$1" started=$SECONDS; shift
    "$@" | tee "$RESULTS_DIR/$step.md" || status=1
    echo "run_gpu.sh: $step took $((SECONDS - started))s" >&2
}

if has_step scenario || has_step sweep || has_step sampling || has_step prefix; then
    text-generation-launcher --model-id "$MODEL_DIR" --dtype "$DTYPE" --hostname 127.0.0.1 --port "$PORT" \
        "${LIMITS[@]}" --max-concurrent-requests 1024 >"$RESULTS_DIR/launcher.log" 2>&1 &
    server_pid=$!
    wait_for "/health" 900 "$RESULTS_DIR/launcher.log" http_get "http://127.0.0.1:$PORT/health"
    http_get "http://127.0.0.1:$PORT/info" >"$RESULTS_DIR/info.json" || true
    load=(python3 benchmark/load.py --url "http://127.0.0.1:$PORT" --tokenizer "$MODEL_DIR/tokenizer.json")
    if has_step scenario; then
        run_step scenario "${load[@]}" --scenario --out "$RESULTS_DIR/scenario.json"
    fi
    if has_step sweep; then
        run_step sweep "${load[@]}" --concurrency "$CONCURRENCY" --out "$RESULTS_DIR/sweep.json"
    fi
    if has_step sampling; then
        run_step sampling "${load[@]}" --sampling-sweep ${SAMPLING_PRESETS:+--sampling-presets "$SAMPLING_PRESETS"} \
            --out "$RESULTS_DIR/sampling.json"
    fi
    if has_step prefix; then
        run_step prefix "${load[@]}" --prefix-scenarios --out "$RESULTS_DIR/prefix.json"
        http_get "http://127.0.0.1:$PORT/metrics" | grep '^tgi_prefix_cache\|^tgi_prefill_chunked' \
            >"$RESULTS_DIR/prefix-metrics.txt" || true
    fi
    stop_server
fi

if has_step shard; then
    rm -f "$SHARD_UDS-0"
    text-generation-shard --model-path "$MODEL_DIR" --uds-path "$SHARD_UDS" --dtype "$DTYPE" \
        >"$RESULTS_DIR/shard.log" 2>&1 &
    server_pid=$!
    wait_for "the shard's socket" 900 "$RESULTS_DIR/shard.log" test -S "$SHARD_UDS-0"
    # shellcheck disable=SC2086
    run_step shard text-generation-benchmark --uds-path "$SHARD_UDS-0" "${LIMITS[@]}" \
        --out "$RESULTS_DIR/shard.json" ${SHARD_BENCH_ARGS:-}
    stop_server
fi

# Tensor parallelism's sharded loading and layer math on CUDA, on a machine with one GPU:
# two shards on GPU 0 joined over TCP (the shard's TENSOR_PARALLEL_ON_ONE_GPU) against one
# shard, greedy; bf16 rounding differs with the split, so leading tokens are compared.
if has_step tp-one-gpu; then
    tp_limits=(--dtype "$DTYPE" --max-input-tokens 512 --max-total-tokens 1024 --max-batch-prefill-tokens 1024)
    run_step tp-one-gpu bash -c "python3 benchmark/greedy_check.py '$MODEL_DIR' '$RESULTS_DIR/tp1.json' -- ${tp_limits[*]} \
        >'$RESULTS_DIR/tp1.log' 2>&1 && TENSOR_PARALLEL_ON_ONE_GPU=true python3 benchmark/greedy_check.py '$MODEL_DIR' \
        '$RESULTS_DIR/tp2.json' --compare '$RESULTS_DIR/tp1.json' -- ${tp_limits[*]} --num-shard 2 \
        --cuda-memory-fraction 0.4 2>'$RESULTS_DIR/tp2.log'"
fi

echo
echo "## Results ($PRESET, $DTYPE, $(head -n 1 "$RESULTS_DIR/gpu.txt"))"
for table in scenario sweep shard sampling prefix tp-one-gpu; do
    if [ -f "$RESULTS_DIR/$table.md" ]; then echo; echo "### $table"; cat "$RESULTS_DIR/$table.md"; fi
done
exit "$status"
