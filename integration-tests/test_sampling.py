"""Sampling through every route against the real server: `min_p` (and vLLM's `top_k` and
`repetition_penalty` on the OpenAI routes) accepted and validated, seeds that reproduce
a sampled text, the seed an unseeded request drew reported back, the model's sampling
defaults in /info."""

import json
from pathlib import Path

import openai
import pytest
import requests

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a colour."}]
# Hot enough that the few tokens are not the greedy ones by chance.
SAMPLED = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.5}


def generate(url: str, **parameters) -> requests.Response:
    return requests.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": parameters}, timeout=120)


@pytest.fixture(scope="module")
def openai_client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def test_min_p_is_accepted_on_every_route(url):
    bodies = {
        "/generate": {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "min_p": 0.1}},
        "/v1/completions": {"prompt": PROMPT, "max_tokens": 3, "min_p": 0.1},
        "/v1/chat/completions": {"messages": CHAT, "max_tokens": 3, "min_p": 0.1},
    }
    for route, body in bodies.items():
        response = requests.post(f"{url}{route}", json=body, timeout=120)
        assert response.status_code == 200, f"{route}: {response.text}"


@pytest.mark.parametrize("min_p", [1.5, -0.1])
def test_min_p_out_of_range_is_422_naming_it(url, min_p):
    bodies = {
        "/generate": {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "min_p": min_p}},
        "/v1/completions": {"prompt": PROMPT, "max_tokens": 3, "min_p": min_p},
        "/v1/chat/completions": {"messages": CHAT, "max_tokens": 3, "min_p": min_p},
    }
    for route, body in bodies.items():
        response = requests.post(f"{url}{route}", json=body, timeout=60)
        assert response.status_code == 422, f"{route}: {response.text}"
        error = response.json()["error"]
        message = error if isinstance(error, str) else error["message"]
        assert "`min_p` must be in [0, 1]" in message, f"{route}: {message}"


def test_a_seed_gives_the_same_sampled_text_twice(url, openai_client):
    texts = [generate(url, seed=1234, min_p=0.05, **SAMPLED).json()["generated_text"] for _ in range(2)]
    assert texts[0] == texts[1]
    completions = [
        openai_client.completions.create(model="tgi", prompt=PROMPT, max_tokens=6, temperature=1.5, seed=99).choices[0].text
        for _ in range(2)
    ]
    assert completions[0] == completions[1]


def test_an_unseeded_sampled_request_reports_the_seed_it_drew(url):
    body = generate(url, details=True, **SAMPLED).json()
    seed = body["details"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**63, body
    # The reported seed is one a client can send, and it reproduces the text.
    again = generate(url, details=True, seed=seed, **SAMPLED).json()
    assert again["details"]["seed"] == seed
    assert again["generated_text"] == body["generated_text"]
    # Streamed, the last event's details carry it too.
    response = requests.post(
        f"{url}/generate_stream", json={"inputs": PROMPT, "parameters": SAMPLED}, stream=True, timeout=120
    )
    assert response.status_code == 200, response.text
    events = [json.loads(line[len("data:"):]) for line in response.iter_lines(decode_unicode=True) if line.startswith("data:")]
    assert isinstance(events[-1]["details"]["seed"], int), events[-1]
    # Greedy requests draw none.
    assert generate(url, max_new_tokens=2, details=True).json()["details"]["seed"] is None


def test_openai_client_with_vllm_extra_fields(openai_client):
    completion = openai_client.chat.completions.create(
        model="tgi", messages=CHAT, max_tokens=4, seed=7, extra_body={"min_p": 0.1, "top_k": 20, "repetition_penalty": 1.1}
    )
    assert completion.choices[0].message.content
    legacy = openai_client.completions.create(
        model="tgi", prompt=PROMPT, max_tokens=4, extra_body={"min_p": 0.1, "top_k": -1}
    )
    assert legacy.choices[0].text


def test_info_reports_no_generation_defaults_for_a_gguf_model(url, launcher):
    model = Path(launcher.model_id)
    if (model / "config.json").is_file():
        pytest.skip("a Hugging Face directory: its generation_config.json decides")
    # A GGUF file has no generation config: nothing to default to.
    assert requests.get(f"{url}/info", timeout=10).json()["generation_defaults"] == {}
