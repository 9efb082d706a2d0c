"""Client mistakes against the shared server: every one gets a 4xx with a clear message
in the route's error shape, none gets a 5xx, and the server keeps serving afterwards.
What test_api.py already checks (a few 422 parameters, a too-long /generate prompt) is
not repeated here."""

import pytest
import requests

PROMPT = "The capital of France is"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
JSON = {"Content-Type": "application/json"}
# Each generation route with a valid body, which the cases below break one way or another.
ROUTES = {
    "/generate": {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
    "/generate_stream": {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
    "/": {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
    "/v1/chat/completions": CHAT,
    "/v1/completions": {"prompt": PROMPT, "max_tokens": 2},
    "/tokenize": {"inputs": PROMPT},
}
GENERATE_ROUTES = ["/generate", "/generate_stream", "/"]


def post_raw(url: str, route: str, body: bytes, headers=JSON) -> requests.Response:
    return requests.post(f"{url}{route}", data=body, headers=headers, timeout=60)


def assert_client_error(response: requests.Response, route: str, status: int) -> str:
    """The status, and a non-empty message in TGI's or OpenAI's error shape; returns it."""
    assert response.status_code == status, f"{route}: {response.status_code} {response.text[:500]}"
    body = response.json()
    if route.startswith("/v1/"):
        message = body["error"]["message"]
        assert body["error"]["type"] == "invalid_request_error", body
    else:
        message = body["error"]
        assert body["error_type"], body
    assert message, body
    return message


RAW_BODIES = [
    pytest.param(b'{"inputs": "Hi"', 400, "EOF", id="truncated"),
    # Cut inside the key itself: a complete unknown key (`parameters` of /v1/completions) is a 422 first.
    pytest.param(b'{"inputs": "Hi", "max_new', 400, "EOF", id="truncated-in-key"),
    pytest.param(b"", 400, "EOF", id="empty-body"),
    pytest.param(b"inputs=Hi", 400, "expected value", id="not-json"),
    pytest.param(b'{"inputs": "Hi",}', 400, "trailing comma", id="trailing-comma"),
    pytest.param(b'{"inputs": "\xff\xfe"}', 400, "invalid unicode", id="invalid-utf8"),
    pytest.param(b'{"inputs": "\\ud800 lone surrogate"}', 400, "hex escape", id="lone-surrogate"),
    pytest.param(b'{"inputs": NaN}', 400, "expected value", id="nan-literal"),
    pytest.param(b'{"inputs": 1e400}', 400, "out of range", id="float-overflow"),
    pytest.param(b"[1, 2]", 422, "", id="array"),
    pytest.param(b"null", 422, "", id="null"),
]


# The prompt field of each route the raw bodies are sent to. (Chat messages are objects in
# a list: the structured cases above and below cover that route.)
PROMPT_FIELDS = {"/generate": b'"inputs"', "/tokenize": b'"inputs"', "/v1/completions": b'"prompt"'}


@pytest.mark.parametrize("route", list(PROMPT_FIELDS))
@pytest.mark.parametrize("body,status,message", RAW_BODIES)
def test_unparsable_bodies(url, route, body, status, message):
    body = body.replace(b'"inputs"', PROMPT_FIELDS[route])
    text = assert_client_error(post_raw(url, route, body), route, status)
    assert message in text


@pytest.mark.parametrize("route", list(ROUTES))
def test_wrong_content_type_is_415(url, route):
    response = post_raw(url, route, b'{"inputs": "Hi"}', headers={"Content-Type": "text/plain"})
    assert_client_error(response, route, 415)


@pytest.mark.parametrize("route", list(ROUTES))
def test_body_over_payload_limit_is_413(url, route):
    # The launcher's default --payload-limit is 2 MB.
    body = b'{"inputs": "' + b"a" * 2_100_000 + b'"}'
    assert_client_error(post_raw(url, route, body), route, 413)


# (parameters, what the message names)
BAD_PARAMETERS = [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 1.5}, "max_new_tokens"),
    ({"max_new_tokens": "ten"}, "max_new_tokens"),
    ({"max_new_tokens": 4294967295}, "max_new_tokens"),
    ({"max_new_tokens": 4294967296}, "max_new_tokens"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -3}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"typical_p": 1.0}, "typical_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": "low"}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"frequency_penalty": 3.0}, "frequency_penalty"),
    ({"truncate": 0}, "truncate"),
    ({"truncate": 4294967295}, "truncate"),
    ({"seed": -1}, "seed"),
    ({"seed": 18446744073709551615}, "seed"),
    ({"seed": 18446744073709551616}, "seed"),
    ({"best_of": 2}, "best_of"),
    ({"watermark": True}, "watermark"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "not a list"}, "stop"),
    ({"top_n_tokens": 6}, "top_n_tokens"),
    ({"top_n_tokens": -1}, "top_n_tokens"),
]


@pytest.mark.parametrize("route", GENERATE_ROUTES)
@pytest.mark.parametrize("parameters,name", BAD_PARAMETERS, ids=[n for _, n in BAD_PARAMETERS])
def test_bad_parameters_are_422(url, route, parameters, name):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, **parameters}}
    message = assert_client_error(requests.post(f"{url}{route}", json=body, timeout=60), route, 422)
    assert name in message


BAD_OPENAI = [
    ("/v1/chat/completions", {"model": "tgi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "Hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "content"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_new_tokens"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 2}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "n": 2}, "n"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 50}, "top_n_tokens"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": -5}, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "min_p": 1.5}, "min_p"),
    ("/v1/chat/completions", {**CHAT, "top_k": -2}, "top_k"),
    ("/v1/chat/completions", {**CHAT, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "min_p": -0.1}, "min_p"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "", "max_tokens": 2}, "empty"),
    ("/v1/completions", {"prompt": 42, "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": -2}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "seed": -7}, "seed"),
    ("/tokenize", {"inputs": ""}, "empty"),
    ("/tokenize", {}, "inputs"),
    ("/generate", {"inputs": ""}, "empty"),
    ("/generate", {"inputs": 12}, "inputs"),
    ("/generate", {"inputs": PROMPT, "parameters": "greedy"}, "parameters"),
    ("/generate_stream", {"inputs": PROMPT, "parameters": {"decoder_input_details": True}}, "decoder_input_details"),
    ("/", {"inputs": PROMPT, "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize("route,body,name", BAD_OPENAI, ids=[f"{r}-{n}" for r, _, n in BAD_OPENAI])
def test_bad_fields_are_422(url, route, body, name):
    message = assert_client_error(requests.post(f"{url}{route}", json=body, timeout=60), route, 422)
    assert name in message


LONG_PROMPT = "hello " * 5000  # over the default 4095 input tokens


@pytest.mark.parametrize(
    "route,body",
    [
        ("/generate_stream", {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 1}}),
        ("/", {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 1}, "stream": True}),
        ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1}),
        ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 4095}}),
    ],
)
def test_prompts_over_the_limits_are_422(url, route, body):
    message = assert_client_error(requests.post(f"{url}{route}", json=body, timeout=60), route, 422)
    assert "tokens" in message


@pytest.mark.parametrize(
    "inputs",
    [
        "\u0000\u0001\u001f",  # control characters
        "\u200b\u200d\ufeff",  # zero-width characters and a BOM
        "\u202eevil\u202c",  # right-to-left override
        "e\u0301\u0301\u0301\u0301",  # stacked combining marks
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # emoji ZWJ sequence
        "\ufffd\uffff\U0010ffff",  # replacement character and noncharacters
        "日本語のテキスト",
    ],
)
def test_odd_unicode_is_served(url, inputs):
    response = requests.post(
        f"{url}/generate", json={"inputs": inputs, "parameters": {"max_new_tokens": 2}}, timeout=120
    )
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["generated_text"], str)


@pytest.mark.parametrize(
    "method,route,status",
    [
        ("GET", "/nope", 404),
        ("POST", "/v1/nope", 404),
        ("GET", "/v1/chat/completions/../../../etc/passwd", 404),
        ("GET", "/generate", 405),
        ("DELETE", "/generate", 405),
        ("PUT", "/v1/chat/completions", 405),
        ("POST", "/health", 405),
        ("PATCH", "/metrics", 405),
    ],
)
def test_unknown_routes_and_methods(url, method, route, status):
    response = requests.request(method, f"{url}{route}", timeout=10)
    assert response.status_code == status, response.text


def test_server_still_serves_and_never_panicked(url, launcher):
    """Runs last in this module: the server survived every case above."""
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    response = requests.post(
        f"{url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}, timeout=120
    )
    assert response.status_code == 200 and response.json()["generated_text"].startswith(" Paris")
    assert "panicked" not in launcher.output(), launcher.tail()
