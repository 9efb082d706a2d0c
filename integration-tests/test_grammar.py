"""Structured output end to end: TGI's `grammar` parameter and OpenAI's `response_format`,
through the official clients, against the real server and the default model. The outputs
must follow their grammar on every request, greedy or sampled."""

import json
import re
from typing import Literal

import openai
import pytest
import requests
from huggingface_hub import InferenceClient
from pydantic import BaseModel, Field

from launcher_harness import Launcher

CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "country": {"enum": ["France", "Italy", "Spain"]},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "country", "capital"],
    "additionalProperties": False,
}
PROMPT = "Paris, as JSON:"
QUESTION = [{"role": "user", "content": "Describe Paris as a JSON object."}]


class City(BaseModel):
    city: str = Field(max_length=16)
    country: Literal["France", "Italy", "Spain"]
    capital: bool


def check_city(text: str) -> City:
    """The text is one JSON object of the schema, and nothing else."""
    return City.model_validate_json(text, strict=True)


@pytest.fixture(scope="module")
def openai_client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def test_generate_follows_a_json_schema_greedy_and_sampled(url):
    for seed in [None, 1, 2, 3]:
        parameters = {"max_new_tokens": 48, "grammar": {"type": "json", "value": CITY_SCHEMA}, "details": True}
        if seed is not None:
            parameters |= {"do_sample": True, "temperature": 1.0, "seed": seed}
        response = requests.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": parameters}, timeout=120)
        assert response.status_code == 200, response.text
        body = response.json()
        check_city(body["generated_text"])
        # The grammar ended the answer, before max_new_tokens.
        assert body["details"]["finish_reason"] == "eos_token", body


def test_generate_stream_follows_a_regex(url):
    regex = r"(Paris|Rome) has [0-9]{1,2} districts\."
    client = InferenceClient(base_url=url, timeout=120)
    pieces = client.text_generation(
        PROMPT, max_new_tokens=24, stream=True, details=True, grammar={"type": "regex", "value": regex}
    )
    text = "".join(piece.token.text for piece in pieces if not piece.token.special)
    assert re.fullmatch(regex, text), text


def test_huggingface_hub_json_grammar(url):
    client = InferenceClient(base_url=url, timeout=120)
    text = client.text_generation(PROMPT, max_new_tokens=48, grammar={"type": "json", "value": CITY_SCHEMA})
    check_city(text)


def test_openai_parse_with_a_pydantic_model(openai_client):
    completion = openai_client.chat.completions.parse(
        model="tgi", messages=QUESTION, response_format=City, max_tokens=48, temperature=0
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, City), message
    assert completion.choices[0].finish_reason == "stop"


def test_openai_json_object_and_schema_on_both_routes(openai_client):
    for seed in range(4):
        chat = openai_client.chat.completions.create(
            model="tgi", messages=QUESTION, max_tokens=48, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}},
        )
        check_city(chat.choices[0].message.content)
    chunks = openai_client.chat.completions.create(
        model="tgi", messages=QUESTION, max_tokens=32, stream=True, response_format={"type": "json_object"}
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert isinstance(json.loads(streamed), dict), streamed
    completion = openai_client.completions.create(
        model="tgi", prompt=PROMPT, max_tokens=48, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}},
    )
    check_city(completion.choices[0].text)


def test_bad_grammars_are_a_422_naming_the_problem(url, openai_client):
    for grammar, expected in [
        ({"type": "regex", "value": "(unclosed"}, "invalid grammar"),
        ({"type": "json", "value": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "nope"),
    ]:
        response = requests.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": {"grammar": grammar}}, timeout=30)
        assert response.status_code == 422, response.text
        assert expected in response.json()["error"], response.text
    with pytest.raises(openai.UnprocessableEntityError, match="nope"):
        openai_client.chat.completions.create(
            model="tgi", messages=QUESTION,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        )


def test_disable_grammar_support_refuses_grammars():
    server = Launcher("--disable-grammar-support")
    try:
        server.wait_healthy()
        response = requests.post(
            f"{server.url}/generate",
            json={"inputs": PROMPT, "parameters": {"grammar": {"type": "regex", "value": "a"}}},
            timeout=30,
        )
        assert response.status_code == 422, response.text
        assert "--disable-grammar-support" in response.json()["error"]
    finally:
        assert server.stop() == 0, server.tail()
