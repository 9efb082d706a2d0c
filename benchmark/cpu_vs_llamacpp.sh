#!/usr/bin/env bash
# This server against llama.cpp's llama-server on this machine's CPU, same GGUF, same
# threads, one after the other: benchmark/load.py streams /v1/completions (128-token
# prompts, 64 new tokens, ignore_eos, greedy) at 1 and 8 streams against each, then a
# table of the figures and their ratios is printed (and written to $OUT_DIR/table.md).
#
# llama-server is built once into ~/.cache/llama-server-<version> from the llama.cpp
# sources that llama-cpp-python's source distribution (PyPI) ships in vendor/llama.cpp
# (cmake and g++ are installed with apt-get when missing).
#
#   benchmark/cpu_vs_llamacpp.sh [GGUF]     # default: the default model (fetched)
#
# Environment: THREADS (default: nproc), LLAMA_CPP_PYTHON_VERSION (0.3.16),
# REQUESTS_1 / REQUESTS_8 (requests timed at 1 / 8 streams: 8 / 32), OUT_DIR
# (default: a temporary folder), PORT (8090, and PORT+1 for llama-server).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.16}"
threads="${THREADS:-$(nproc)}"
port="${PORT:-8090}"
out="${OUT_DIR:-$(mktemp -d)}"
python="${PYTHON:-$root/.venv/bin/python}"
gguf="${1:-$(./scripts/fetch-default-model.sh)}"
cache="$HOME/.cache/llama-server-$version"
mkdir -p "$out"

build_llama_server() {
    [ -x "$cache/llama-server" ] && return
    if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
        apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null
    fi
    local work
    work=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
    tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
    local src="$work/llama_cpp_python-$version/vendor/llama.cpp"
    # Static, native (-march=native through GGML_NATIVE): its fastest build for this CPU.
    cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
    cmake --build "$work/build" --target llama-server -j "$(nproc)" >/dev/null
    mkdir -p "$cache"
    cp "$work/build/bin/llama-server" "$cache/llama-server"
    rm -rf "$work"
}

wait_ready() { # URL PID
    for _ in $(seq 1200); do
        curl -sf "$1/health" >/dev/null 2>&1 && return
        kill -0 "$2" 2>/dev/null || { echo "cpu_vs_llamacpp.sh: the server exited" >&2; return 1; }
        sleep 0.1
    done
    echo "cpu_vs_llamacpp.sh: $1 not ready after 120 s" >&2
    return 1
}

# load.py on a fresh connection per request: llama-server drops kept-alive connections
# after a streamed answer, which aiohttp reuses ("Can not write request body").
load() {
    "$python" -c 'import functools, runpy, sys, aiohttp
aiohttp.TCPConnector = functools.partial(aiohttp.TCPConnector, force_close=True)
sys.argv = ["load.py"] + sys.argv[1:]
runpy.run_path("benchmark/load.py", run_name="__main__")' "$@"
}

# NAME URL: load.py's two levels against the server at URL, into $out/NAME-{1,8}.json.
run_load() {
    local common=(--url "$2" --tokenizer "$out/tokenizer.json" --prompt-tokens 128 --max-tokens 64)
    load "${common[@]}" --concurrency 1 --requests "${REQUESTS_1:-8}" --out "$out/$1-1.json" >&2
    load "${common[@]}" --concurrency 8 --requests "${REQUESTS_8:-32}" --out "$out/$1-8.json" >&2
}

server_pid=
stop_server() {
    if [ -n "$server_pid" ]; then
        kill -INT "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
}
trap stop_server EXIT

# NAME URL COMMAND...: starts COMMAND, times how long until URL answers, loads it, stops it.
bench_server() {
    local name=$1 url=$2
    shift 2
    if curl -sf "$url/health" >/dev/null 2>&1; then
        echo "cpu_vs_llamacpp.sh: something already serves $url" >&2
        return 1
    fi
    local start=$SECONDS
    "$@" >"$out/$name.log" 2>&1 &
    server_pid=$!
    wait_ready "$url" "$server_pid"
    echo "$((SECONDS - start))" >"$out/$name-ready-s"
    run_load "$name" "$url"
    stop_server
}

build_llama_server
cargo build --release -p text-generation-launcher -p text-generation-shard -p text-generation-router
"$python" benchmark/gguf_tokenizer.py "$gguf" "$out/tokenizer.json"

bench_server ours "http://127.0.0.1:$port" target/release/text-generation-launcher \
    --model-id "$gguf" --hostname 127.0.0.1 --port "$port" --num-threads "$threads"
bench_server llama-server "http://127.0.0.1:$((port + 1))" "$cache/llama-server" \
    -m "$gguf" --host 127.0.0.1 --port "$((port + 1))" --threads "$threads" \
    --parallel 8 --ctx-size 4096 --no-webui

"$python" - "$out" <<'PY' | tee "$out/table.md"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])

def level(name, streams):
    [summary] = json.loads((out / f"{name}-{streams}.json").read_text())["levels"]
    return summary

def figures(name):
    one, eight = level(name, 1), level(name, 8)
    return {
        "time per output token, 1 stream (ms)": 1000 / one["decode_tokens_per_s_per_request_p50"],
        "time to first token, 1 stream (ms, p50)": one["ttft_ms_p50"],
        "output tok/s, 8 streams": eight["output_tokens_per_s"],
        "time to first token, 8 streams (ms, p50)": eight["ttft_ms_p50"],
    }

ours, theirs = figures("ours"), figures("llama-server")
print("| | this server | llama-server | ratio (this / llama-server) |")
print("|---|---:|---:|---:|")
for key in ours:
    print(f"| {key} | {ours[key]:.1f} | {theirs[key]:.1f} | {ours[key] / theirs[key]:.2f} |")
ready = {n: (out / f"{n}-ready-s").read_text().strip() for n in ("ours", "llama-server")}
print(f"| ready after start (s) | {ready['ours']} | {ready['llama-server']} | |")
PY
echo "cpu_vs_llamacpp.sh: results in $out" >&2
