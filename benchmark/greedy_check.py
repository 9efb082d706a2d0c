#!/usr/bin/env python3
"""Greedy generations of a model through the whole stack, to compare two builds.

Starts `text-generation-launcher` (from PATH) on MODEL, asks `POST /generate` for the
greedy continuation of a few fixed prompts, writes them (text and token ids) as JSON to
OUT, and stops the launcher. With `--compare REF.json` it also prints, per prompt, how
many leading tokens agree with an earlier run (e.g. the CPU build's), and exits non-zero
when a prompt's first token differs.

    PATH=target/release:$PATH benchmark/greedy_check.py MODEL cpu.json -- --dtype float32
    PATH=.bin:$PATH benchmark/greedy_check.py MODEL cuda.json --compare cpu.json -- --dtype bfloat16
"""

import argparse
import json
import subprocess
import sys
import time
import urllib.request

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"greedy_check.py: the launcher exited with {server.returncode} before /health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    sys.exit(f"greedy_check.py: no /health after {timeout:.0f}s")


def generate(url: str, new_tokens: int) -> list[dict]:
    results = []
    for prompt in PROMPTS:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens, "details": True}}
        answer = post(f"{url}/generate", body)
        ids = [token["id"] for token in answer["details"]["tokens"]]
        results.append({"prompt": prompt, "text": answer["generated_text"], "ids": ids})
    return results


def compare(results: list[dict], reference: list[dict]) -> bool:
    first_tokens_agree = True
    for ours, theirs in zip(results, reference, strict=True):
        agree = 0
        for a, b in zip(ours["ids"], theirs["ids"]):
            if a != b:
                break
            agree += 1
        first_tokens_agree &= agree > 0
        print(f"{agree}/{len(theirs['ids'])} tokens agree: {ours['prompt']!r}")
        print(f"  this run:  {ours['text']!r}\n  reference: {theirs['text']!r}")
    return first_tokens_agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--compare", help="JSON of an earlier run to compare with")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--port", type=int, default=8090)
    # Everything after `--` goes to the launcher.
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    launcher_args = argv[split + 1 :]
    url = f"http://127.0.0.1:{args.port}"
    command = ["text-generation-launcher", "--model-id", args.model, "--hostname", "127.0.0.1",
               "--port", str(args.port), "--shard-uds-path", f"/tmp/greedy-check-{args.port}", *launcher_args]
    server = subprocess.Popen(command, stdout=sys.stderr, stderr=sys.stderr)
    try:
        wait_healthy(url, server, timeout=300)
        results = generate(url, args.new_tokens)
    finally:
        server.terminate()
        server.wait(timeout=60)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            reference = json.load(f)
        if not compare(results, reference):
            sys.exit(1)
    else:
        for result in results:
            print(f"{result['prompt']!r} -> {result['text']!r}")


if __name__ == "__main__":
    main()
