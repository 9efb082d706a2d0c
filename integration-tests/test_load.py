"""A bounded load test on loopback against its own launcher: hundreds of streaming and
non-streaming greedy requests of mixed lengths, more at once than
`--max-concurrent-requests` allows. Every request completes (with the text it gets when
run alone) or is refused with 429; none hangs or fails; afterwards every KV block is
free and the processes' memory is back near its baseline. Clients that leave mid-stream
free their slots.

Size: TGI_LOAD_REQUESTS (default 200) requests from TGI_LOAD_CLIENTS (default 48)
client threads. The figures go to target/reliability/load.json."""

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import requests

from launcher_harness import ROOT, Launcher, assert_all_gone, cmdline, descendants
from test_api import sse_events

REQUESTS = int(os.environ.get("TGI_LOAD_REQUESTS", "200"))
CLIENTS = int(os.environ.get("TGI_LOAD_CLIENTS", "48"))
MAX_CONCURRENT = 32
# The KV capacity equals the longest request: one that needs nearly all of it only runs
# when every block is free.
KV_TOKENS = 1024
REQUEST_TIMEOUT_S = 300
REPORT = ROOT / "target" / "reliability" / "load.json"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "Water boils at",
    # Longer prompts: prefills of different sizes join the running batch.
    "Here is a list of the planets of the solar system, from the closest to the sun: " * 4,
    "In 1492, Columbus sailed the ocean blue. The story of his voyages begins with " * 8,
]
NEW_TOKENS = [2, 12]
CASES = [(prompt, n) for prompt in PROMPTS for n in NEW_TOKENS]


@pytest.fixture(scope="module")
def server():
    launcher = Launcher(
        "--max-total-tokens", str(KV_TOKENS),
        "--max-input-tokens", str(KV_TOKENS - 24),
        # The warmup prefill must fit the small KV cache too.
        "--max-batch-prefill-tokens", str(KV_TOKENS - 24),
        "--max-batch-total-tokens", str(KV_TOKENS),
        "--max-concurrent-requests", str(MAX_CONCURRENT),
    )
    try:
        launcher.wait_healthy()
        children = descendants(launcher.process.pid)
        yield launcher
    finally:
        status = launcher.stop()
    assert status == 0, launcher.tail()
    assert_all_gone(children, launcher)
    assert "panicked" not in launcher.output(), launcher.tail()


def rss_mib(launcher: Launcher) -> float:
    """Resident memory of the shard and the router together."""
    total_kib = 0
    for pid in descendants(launcher.process.pid):
        if "text-generation-" not in cmdline(pid):
            continue
        status = Path(f"/proc/{pid}/status").read_text()
        total_kib += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))
    return total_kib / 1024


def gauge(url: str, name: str) -> float:
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", metrics, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def generate(url: str, prompt: str, new_tokens: int, stream: bool) -> tuple[int, str | None]:
    """(status, generated text or None); the greedy text of `prompt`, streamed or not."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens}}
    route = "/generate_stream" if stream else "/generate"
    with requests.post(f"{url}{route}", json=body, stream=stream, timeout=REQUEST_TIMEOUT_S) as response:
        if response.status_code != 200:
            return response.status_code, None
        if not stream:
            return 200, response.json()["generated_text"]
        events = list(sse_events(response))
        assert "error" not in events[-1], events[-1]
        return 200, events[-1]["generated_text"]


def fills_the_kv_cache(url: str) -> None:
    """A request of nearly KV_TOKENS tokens: it is served only if no block is held."""
    response = requests.post(
        f"{url}/generate",
        json={"inputs": "hello " * 1000, "parameters": {"max_new_tokens": 8, "truncate": KV_TOKENS - 32}},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text


def test_mixed_load_completes_or_is_refused(server):
    url = server.url
    expected = {case: generate(url, *case, stream=False)[1] for case in CASES}
    fills_the_kv_cache(url)
    rss_before = rss_mib(server)

    def client(first: int) -> list[tuple[tuple[str, int], int, str | None, float]]:
        """Its share of the requests, one after the other (a refused one is not retried)."""
        results = []
        for i in range(first, REQUESTS, CLIENTS):
            case = CASES[i % len(CASES)]
            started = time.monotonic()
            status, text = generate(url, *case, stream=i % 2 == 0)
            results.append((case, status, text, time.monotonic() - started))
        return results

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        futures = [pool.submit(client, first) for first in range(CLIENTS)]
        _, pending = wait(futures, timeout=REQUEST_TIMEOUT_S * 4)
        assert not pending, f"{len(pending)} clients still waiting: the server hangs"
    duration = time.monotonic() - started
    results = [result for f in futures for result in f.result()]

    completed = [(case, text, latency) for case, status, text, latency in results if status == 200]
    rejected = [r for r in results if r[1] == 429]
    errors = [(case, status) for case, status, _, _ in results if status not in (200, 429)]
    wrong = [(case[0][:40], case[1], expected[case], text) for case, text, _ in completed if text != expected[case]]

    # Everything finished: nothing queued or running, and a request that needs the whole
    # KV cache fits, so no block is held.
    assert gauge(url, "tgi_queue_size") == 0
    assert gauge(url, "tgi_batch_current_size") == 0
    fills_the_kv_cache(url)
    rss_after = rss_mib(server)

    latencies = sorted(latency for _, _, latency in completed)
    figures = {
        "requests": REQUESTS,
        "clients": CLIENTS,
        "max_concurrent_requests": MAX_CONCURRENT,
        "completed": len(completed),
        "rejected_429": len(rejected),
        "errors": len(errors),
        "wrong_text": len(wrong),
        "duration_s": round(duration, 1),
        "latency_p50_s": round(latencies[len(latencies) // 2], 2) if latencies else None,
        "latency_p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2) if latencies else None,
        "rss_before_mib": round(rss_before),
        "rss_after_mib": round(rss_after),
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))

    assert not errors, errors[:5]
    assert not wrong, wrong[:3]
    assert len(completed) + len(rejected) == REQUESTS
    # Only the clients over the limit can be refused, and only while every slot is taken.
    assert len(completed) >= REQUESTS * MAX_CONCURRENT // CLIENTS // 2, figures
    # Memory back near its baseline: no growth per request.
    assert rss_after < rss_before * 1.2 + 64, figures


def test_disconnected_streams_free_their_slots(server):
    """Take every concurrency slot with streams (a few running, the rest queued: they do
    not all fit in the KV cache), drop them all: the same number of new requests is then
    served, none refused."""
    url = server.url
    # Near-uniform sampling: these streams would run for their 400 tokens if not dropped.
    endless = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 400, "do_sample": True, "temperature": 100.0}}
    # The response headers come when the request is admitted, before its first token.
    streams = [
        requests.post(f"{url}/generate_stream", json=endless, stream=True, timeout=REQUEST_TIMEOUT_S)
        for _ in range(MAX_CONCURRENT)
    ]
    assert [s.status_code for s in streams] == [200] * MAX_CONCURRENT
    assert requests.post(f"{url}/generate", json={"inputs": "Hi"}, timeout=30).status_code == 429
    for response in streams:
        response.close()

    deadline = time.monotonic() + 30
    while gauge(url, "tgi_batch_current_size") > 0 or gauge(url, "tgi_queue_size") > 0:
        assert time.monotonic() < deadline, "dropped streams still running or queued after 30 s"
        time.sleep(0.2)
    with ThreadPoolExecutor(max_workers=MAX_CONCURRENT) as pool:
        statuses = list(pool.map(lambda _: generate(url, "Hi", 1, stream=False)[0], range(MAX_CONCURRENT)))
    assert statuses == [200] * MAX_CONCURRENT
    fills_the_kv_cache(url)
