"""Faults, each against its own launcher: a shard killed mid-generation, SIGTERM while
requests are in flight, and shards that cannot start. Nothing hangs, errors are clear,
no process is left behind. (test_launcher.py covers a shard killed while idle, SIGINT
when idle, a missing model path and inconsistent flags.)"""

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from launcher_harness import MODEL, Launcher, alive, assert_all_gone, cmdline, descendants
from test_api import sse_events

SMALL = ("--max-total-tokens", "512")
PROMPT = "Tell me a story"
# Near-uniform sampling almost never draws the end-of-sequence token: these requests run
# for all their tokens.
SAMPLED = {"do_sample": True, "temperature": 100.0, "seed": 3}


def open_stream(url: str, max_new_tokens: int) -> requests.Response:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": max_new_tokens, "details": True, **SAMPLED}}
    response = requests.post(f"{url}/generate_stream", json=body, stream=True, timeout=60)
    assert response.status_code == 200, response.text
    return response


def left_processes(launcher: Launcher) -> dict[int, str]:
    """Processes still running that were started for this launcher (its socket path is
    on their command line)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and launcher.uds_path in cmdline(int(entry)) and alive(int(entry)):
            found[int(entry)] = cmdline(int(entry))
    return found


def finish(stream_events) -> str:
    """How a stream whose shard failed ended: an error event, or the connection closing."""
    try:
        for event in stream_events:
            if "error" in event:
                return event["error"]
            assert event.get("generated_text") is None, "a stream finished although its shard failed"
    except requests.exceptions.RequestException as error:
        return f"connection: {type(error).__name__}"
    return "closed"


def test_shard_killed_mid_generation_fails_requests_and_launcher():
    launcher = Launcher(*SMALL)
    launcher.wait_healthy()
    children = descendants(launcher.process.pid)
    shard = next(p for p in children if "text-generation-shard" in cmdline(p))
    streams = [open_stream(launcher.url, 400) for _ in range(3)]
    events = [sse_events(s) for s in streams]
    for stream_events in events:
        next(stream_events)

    os.kill(shard, signal.SIGKILL)

    # Each in-flight stream ends (the requests' read timeout bounds a hang at 60 s).
    with ThreadPoolExecutor(max_workers=len(streams)) as pool:
        endings = list(pool.map(finish, events))
    assert all(endings), endings

    try:
        health = requests.get(f"{launcher.url}/health", timeout=10).status_code
    except requests.ConnectionError:
        health = None  # the server already went away
    assert health in (503, None)
    status = launcher.wait_exit()
    assert status != 0, launcher.tail()
    assert "shard-0 exited unexpectedly (killed by signal SIGKILL)" in launcher.output(), launcher.tail()
    assert_all_gone(children, launcher)
    assert "panicked" not in launcher.output(), launcher.tail()


def test_stopped_shard_is_declared_stuck_and_the_group_torn_down():
    """SIGSTOP of the shard mid-stream: the step misses its deadline (--shard-timeout 3
    plus 10 ms a token), the stream ends with an error naming the shard and the call,
    /health and new requests get 503 at once, and the launcher stops the group (the
    stopped shard included) and exits non-zero."""
    launcher = Launcher(*SMALL, "--shard-timeout", "3")
    launcher.wait_healthy()
    children = descendants(launcher.process.pid)
    shard = next(p for p in children if "text-generation-shard" in cmdline(p))
    events = sse_events(open_stream(launcher.url, 400))
    next(events)

    os.kill(shard, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        ending = finish(events)
        ended_after = time.monotonic() - stopped
        assert "did not answer Decode within 3.0 s" in ending and launcher.uds_path in ending, ending
        assert ended_after < 6, ended_after

        asked = time.monotonic()
        health = requests.get(f"{launcher.url}/health", timeout=5)
        assert health.status_code == 503 and time.monotonic() - asked < 1, health.text
        refused = requests.post(f"{launcher.url}/generate", json={"inputs": PROMPT}, timeout=5)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error_type"] == "shard_stuck", refused.text

        status = launcher.wait_exit()
        exited_after = time.monotonic() - stopped
    finally:
        if alive(shard):
            os.kill(shard, signal.SIGCONT)
    assert status != 0, launcher.tail()
    assert exited_after < 20, exited_after
    print(f"stopped shard: stream ended after {ended_after:.1f} s, launcher exited after {exited_after:.1f} s")
    assert "the shard group is stuck" in launcher.output(), launcher.tail()
    assert_all_gone(children, launcher)


def test_out_of_memory_step_fails_only_its_requests():
    """The third step after warmup fails as a CUDA out-of-memory error would (the shard's
    debug knob DEBUG_FAIL_STEPS): that step's request gets an error, its KV blocks are
    freed (a request needing every block of the cache is served next), and the
    server keeps serving."""
    kv_tokens = 1024
    launcher = Launcher(
        "--max-input-tokens", "128", "--max-batch-prefill-tokens", "128",
        "--max-total-tokens", str(kv_tokens), "--max-batch-total-tokens", str(kv_tokens),
        env={"DEBUG_FAIL_STEPS": "3"},
    )
    launcher.wait_healthy()
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, **SAMPLED}}
    failed = requests.post(f"{launcher.url}/generate", json=body, timeout=60)
    assert failed.status_code == 424, failed.text
    assert "out of memory" in failed.json()["error"], failed.text

    prompt_tokens = len(requests.post(f"{launcher.url}/tokenize", json={"inputs": PROMPT}, timeout=10).json())
    # Admitted only if no block is held; it stops at its first space, so it runs briefly.
    whole_cache = {"inputs": PROMPT, "parameters": {"max_new_tokens": kv_tokens - prompt_tokens, "stop": [" "]}}
    served = requests.post(f"{launcher.url}/generate", json=whole_cache, timeout=120)
    assert served.status_code == 200, served.text
    assert requests.get(f"{launcher.url}/health", timeout=5).status_code == 200
    launcher.process.send_signal(signal.SIGTERM)
    assert launcher.wait_exit() == 0, launcher.tail()


def test_sigterm_drains_requests_in_flight():
    launcher = Launcher(*SMALL)
    launcher.wait_healthy()
    children = descendants(launcher.process.pid)
    # Few enough to finish within the harness's 30 s grace period on a busy 2-core machine.
    new_tokens = 16
    stream = open_stream(launcher.url, new_tokens)
    stream_events = sse_events(stream)
    next(stream_events)

    launcher.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    # New requests are refused while the old one finishes.
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{launcher.url}/generate", json={"inputs": PROMPT}, timeout=10)
    final = list(stream_events)[-1]
    assert final["details"]["finish_reason"] == "length", final
    assert final["details"]["generated_tokens"] == new_tokens, final

    assert launcher.wait_exit() == 0, launcher.tail()
    assert_all_gone(children, launcher)
    assert launcher.shard_sockets() == []


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def corrupt_safetensors(directory: Path) -> Path:
    (directory / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    # A header length far past the end of the file.
    (directory / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    return directory


def unsupported_architecture(directory: Path) -> Path:
    config = {**LLAMA_CONFIG, "architectures": ["BertForMaskedLM"], "model_type": "bert"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    return directory


def truncated_gguf(directory: Path) -> Path:
    source = MODEL if MODEL.is_file() else next(MODEL.glob("*.gguf"))
    with open(source, "rb") as full, open(directory / "model.gguf", "wb") as cut:
        cut.write(full.read(4 << 20))
    return directory / "model.gguf"


@pytest.mark.parametrize(
    "make_model,message",
    [
        (corrupt_safetensors, "safetensors"),
        (unsupported_architecture, "bert"),
        (truncated_gguf, "gguf"),
    ],
    ids=["corrupt-safetensors", "unsupported-architecture", "truncated-gguf"],
)
def test_shard_that_cannot_start_is_one_clear_error(tmp_path, make_model, message):
    launcher = Launcher(*SMALL, model=make_model(tmp_path))
    status = launcher.wait_exit(timeout=120)
    output = launcher.output()
    assert status != 0, output
    assert message in output.lower(), output
    assert "panicked" not in output, output
    assert left_processes(launcher) == {}, launcher.tail()
    assert launcher.shard_sockets() == []
    shutil.rmtree(tmp_path, ignore_errors=True)
