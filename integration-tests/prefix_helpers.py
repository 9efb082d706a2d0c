"""What the prefix caching and chunked prefill tests share: a long prompt, greedy
generation and reading counters from /metrics."""

import re

import requests

# About 300 tokens: many KV blocks, several prefill chunks of 64.
LONG_PROMPT = " ".join(
    f"Chapter {i}: the travellers crossed the river at dawn, counted their supplies, and "
    f"wrote down what they had seen of the hills to the north."
    for i in range(1, 12)
) + " At the end of the journey, the travellers"


def greedy_tokens(url: str, inputs: str, max_new_tokens: int = 16, **parameters) -> list[int]:
    body = {"inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens, "details": True, **parameters}}
    response = requests.post(f"{url}/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def counter(url: str, name: str) -> float:
    """A counter of /metrics (0 before it was first incremented)."""
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def prompt_length(url: str, inputs: str) -> int:
    response = requests.post(f"{url}/tokenize", json={"inputs": inputs}, timeout=10)
    assert response.status_code == 200, response.text
    return len(response.json())
