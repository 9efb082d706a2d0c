"""The HTTP API end to end: TGI routes, the OpenAI-compatible routes, and the official
clients (openai, text-generation, huggingface_hub) against the real server."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from huggingface_hub import InferenceClient
from text_generation import Client

PROMPT = "The capital of France is"
# The 135M model answers this one greedily with a clear margin at every token ("The
# capital of France is Paris."); "What is the capital of France?" is a near tie at the
# first token between "The" and "L", which rounding differences may flip either way.
QUESTION = [{"role": "user", "content": "Name the capital of France."}]


def generate(url: str, inputs: str, **parameters) -> requests.Response:
    return requests.post(f"{url}/generate", json={"inputs": inputs, "parameters": parameters}, timeout=120)


def sse_events(response: requests.Response):
    """The JSON payloads of a server-sent-events response."""
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            data = line[len("data:"):].strip()
            if data != "[DONE]":
                yield json.loads(data)


@pytest.fixture(scope="module")
def openai_client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def test_health(url):
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_info_reports_model_and_default_limits(url, launcher):
    info = requests.get(f"{url}/info", timeout=10).json()
    assert info["model_id"] == launcher.model_id
    # SmolLM2's 8192-token context capped at TGI's default of 4096.
    assert info["max_total_tokens"] == 4096
    assert info["max_input_tokens"] == 4095


def test_generate_greedy(url):
    response = generate(url, PROMPT, max_new_tokens=8)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["generated_text"].startswith(" Paris"), body


def test_generate_details(url):
    body = generate(url, PROMPT, max_new_tokens=4, details=True).json()
    details = body["details"]
    assert details["generated_tokens"] == len(details["tokens"]) <= 4
    assert details["finish_reason"] in ("length", "eos_token", "stop_sequence")
    assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]


def test_generate_stream_sse(url):
    response = requests.post(
        f"{url}/generate_stream",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8}},
        stream=True,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = list(sse_events(response))
    assert len(events) >= 1
    assert all(e["token"]["text"] is not None for e in events)
    assert all(e["generated_text"] is None for e in events[:-1])
    final = events[-1]["generated_text"]
    assert final == "".join(e["token"]["text"] for e in events)
    assert final == generate(url, PROMPT, max_new_tokens=8).json()["generated_text"]


def test_tokenize(url):
    response = requests.post(f"{url}/tokenize", json={"inputs": "Hello world"}, timeout=10)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert len(tokens) == 2
    # Each text is the slice of the input its character offsets cover.
    assert all("Hello world"[t["start"]:t["stop"]] == t["text"] for t in tokens)
    assert all(isinstance(t["id"], int) for t in tokens)


def test_metrics(url):
    generate(url, PROMPT, max_new_tokens=1)
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    assert "tgi_request_count" in metrics


@pytest.mark.parametrize(
    "parameters",
    [
        {"max_new_tokens": 0},
        {"temperature": -1.0},
        {"top_p": 1.5},
    ],
)
def test_invalid_parameters_are_422(url, parameters):
    response = generate(url, PROMPT, **parameters)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error_type"] == "validation"
    assert body["error"]


def test_too_long_input_is_422(url):
    response = generate(url, "hello " * 5000, max_new_tokens=1)
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation"


def test_chat_completion(openai_client):
    completion = openai_client.chat.completions.create(
        model="tgi", messages=QUESTION, max_tokens=32, temperature=0
    )
    choice = completion.choices[0]
    assert "Paris" in choice.message.content, choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_chat_completion_stream_with_usage(openai_client):
    stream = openai_client.chat.completions.create(
        model="tgi",
        messages=QUESTION,
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text, text
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens > 0
    non_stream = openai_client.chat.completions.create(model="tgi", messages=QUESTION, max_tokens=32, temperature=0)
    assert text == non_stream.choices[0].message.content


def test_completions(openai_client):
    completion = openai_client.completions.create(model="tgi", prompt=PROMPT, max_tokens=8, temperature=0)
    assert completion.choices[0].text.startswith(" Paris"), completion.choices[0].text
    stream = openai_client.completions.create(model="tgi", prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in stream if c.choices)
    assert streamed == completion.choices[0].text


def test_text_generation_client(url):
    client = Client(url, timeout=120)
    response = client.generate(PROMPT, max_new_tokens=8)
    assert response.generated_text.startswith(" Paris")
    assert response.details.generated_tokens <= 8
    streamed = [r for r in client.generate_stream(PROMPT, max_new_tokens=8)]
    assert "".join(r.token.text for r in streamed) == response.generated_text
    assert streamed[-1].generated_text == response.generated_text


def test_huggingface_hub_inference_client(url):
    client = InferenceClient(base_url=url, timeout=120)
    assert client.text_generation(PROMPT, max_new_tokens=8).startswith(" Paris")
    chat = client.chat_completion(messages=QUESTION, max_tokens=32, temperature=0)
    assert "Paris" in chat.choices[0].message.content


CONCURRENT_PROMPTS = [
    "The capital of France is",
    "One, two, three,",
    "def fibonacci(n):",
    "The largest planet in the solar system is",
    "Once upon a time",
    "Water boils at",
    "The opposite of hot is",
    "My favourite colour is",
]


# Greedy tokens whose runner-up is closer than this (in log-probability) may flip with the
# batch's composition: float sums in another order, then the quantized matmuls' int8
# rounding of activations, move logits by a few hundredths.
NEAR_TIE = 0.3


def stable_prefix(url: str, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation up to its first near tie, from a request running alone."""
    details = generate(url, prompt, max_new_tokens=max_new_tokens, details=True, top_n_tokens=2).json()["details"]
    text = ""
    for token, top in zip(details["tokens"], details["top_tokens"]):
        if len(top) > 1 and top[0]["logprob"] - top[1]["logprob"] < NEAR_TIE:
            break
        text += token["text"]
    return text


def test_64_concurrent_streams_match_sequential_greedy(url):
    expected = {p: stable_prefix(url, p, max_new_tokens=16) for p in CONCURRENT_PROMPTS}
    assert sum(len(t) for t in expected.values()) > 40, expected

    def stream(i: int) -> tuple[str, str]:
        prompt = CONCURRENT_PROMPTS[i % len(CONCURRENT_PROMPTS)]
        response = requests.post(
            f"{url}/generate_stream",
            json={"inputs": prompt, "parameters": {"max_new_tokens": 16}},
            stream=True,
            timeout=600,
        )
        assert response.status_code == 200, response.text
        events = list(sse_events(response))
        return prompt, events[-1]["generated_text"]

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(stream, range(64)))
    assert len(results) == 64
    for prompt, text in results:
        assert text.startswith(expected[prompt]), (prompt, text, expected[prompt])


def batch_size(url: str) -> float:
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    match = re.search(r"^tgi_batch_current_size(?:\{[^}]*\})? (\S+)$", metrics, re.MULTILINE)
    assert match, "tgi_batch_current_size missing from /metrics"
    return float(match.group(1))


def test_disconnected_stream_stops_generation(url):
    # Near-uniform sampling almost never draws the end-of-sequence token: without the
    # disconnect this would run for thousands of tokens.
    parameters = {"max_new_tokens": 3000, "do_sample": True, "temperature": 100.0, "seed": 0}
    response = requests.post(
        f"{url}/generate_stream", json={"inputs": PROMPT, "parameters": parameters}, stream=True, timeout=120
    )
    events = sse_events(response)
    for _ in range(5):
        next(events)
    assert batch_size(url) >= 1
    response.close()

    deadline = time.monotonic() + 15
    while batch_size(url) > 0:
        assert time.monotonic() < deadline, "generation still running 15 s after the client left"
        time.sleep(0.2)
    # And the server still serves.
    assert generate(url, PROMPT, max_new_tokens=2).status_code == 200
