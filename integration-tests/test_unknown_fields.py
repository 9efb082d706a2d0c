"""Fields we do not implement are never silently ignored: an unknown field is a 422 naming
it on every route, and a field that official clients send although we do not implement it
passes only with a value that asks for nothing (null, empty, its neutral default)."""

import copy

import pytest
import requests
from text_generation.types import ChatRequest, Message, Parameters, Request

from test_bad_input import CHAT, PROMPT, ROUTES, assert_client_error

# (route, where the field goes: None for the body itself, else the key of a nested object)
OBJECTS = [(route, None) for route in ROUTES] + [
    ("/generate", "parameters"),
    ("/generate_stream", "parameters"),
    ("/", "parameters"),
    ("/tokenize", "parameters"),
    ("/v1/chat/completions", "stream_options"),
]


def with_field(route: str, nested, field: str, value) -> dict:
    """The route's valid body with `field` set in it, or in its object `nested`."""
    body = copy.deepcopy(ROUTES[route])
    (body if nested is None else body.setdefault(nested, {}))[field] = value
    return body


@pytest.mark.parametrize("route,nested", OBJECTS, ids=[f"{r}-{n or 'body'}" for r, n in OBJECTS])
def test_unknown_field_is_422_naming_it(url, route, nested):
    body = with_field(route, nested, "frobnicate", None)
    message = assert_client_error(requests.post(f"{url}{route}", json=body, timeout=60), route, 422)
    assert "unknown field `frobnicate`" in message


def test_unknown_field_of_a_chat_message_is_422_naming_it(url):
    body = {**CHAT, "messages": [{"role": "user", "content": "Hi", "audio": {"id": "a"}}]}
    route = "/v1/chat/completions"
    assert "unknown field `audio`" in assert_client_error(requests.post(f"{url}{route}", json=body, timeout=60), route, 422)


# (route, nested object, field, neutral value, a value that asks for something)
NEUTRAL_ONLY = [
    ("/v1/chat/completions", None, "logit_bias", {}, {"42": -100}),
    ("/v1/completions", None, "logit_bias", {}, {"42": -100}),
    ("/v1/completions", None, "best_of", 1, 3),
    ("/v1/completions", None, "suffix", "", " and so on"),
] + [(route, "parameters", "adapter_id", "", "lora") for route in ["/generate", "/generate_stream", "/"]]


@pytest.mark.parametrize("route,nested,field,neutral,asking", NEUTRAL_ONLY, ids=[f"{r}-{f}" for r, _, f, _, _ in NEUTRAL_ONLY])
def test_unsupported_field_passes_only_when_neutral(url, route, nested, field, neutral, asking):
    for value in [None, neutral]:
        response = requests.post(f"{url}{route}", json=with_field(route, nested, field, value), timeout=60)
        assert response.status_code == 200, f"{field}={value!r}: {response.text[:300]}"
    response = requests.post(f"{url}{route}", json=with_field(route, nested, field, asking), timeout=60)
    assert f"`{field}` is not supported" in assert_client_error(response, route, 422)


def test_openai_model_and_user_are_accepted(url):
    for route in ["/v1/chat/completions", "/v1/completions"]:
        response = requests.post(f"{url}{route}", json={**ROUTES[route], "model": "gpt-4", "user": "me"}, timeout=60)
        assert response.status_code == 200, response.text[:300]


def test_what_the_text_generation_client_sends_is_accepted(url):
    """Its pydantic bodies carry every field of TGI's API, unset ones as null or false
    (`grammar: null`, `tools: null`, messages' `tool_calls: null`, ...); `.dict()` is what
    the client itself posts."""
    generate = Request(inputs=PROMPT, parameters=Parameters(max_new_tokens=2), stream=False).dict()
    chat = ChatRequest(model="tgi", messages=[Message(role="user", content="Hi")], max_tokens=2).dict()
    assert generate["parameters"]["grammar"] is None and chat["tools"] is None, (generate, chat)
    for route, body in [("/", generate), ("/v1/chat/completions", chat)]:
        response = requests.post(f"{url}{route}", json=body, timeout=60)
        assert response.status_code == 200, f"{route}: {response.text[:300]}"
