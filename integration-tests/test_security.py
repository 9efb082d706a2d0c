"""A server with `--api-key`, as operators put it on the internet: the key guards every
generation route (and only those), requests cannot make the server read files or reach
other hosts, and the limits answer at once, before any work is queued."""

import socket
import threading
import time

import pytest
import requests

from launcher_harness import Launcher, assert_all_gone, descendants
from test_api import sse_events

KEY = "s3cret-key-for-tests"
PROMPT = "The capital of France is"
GUARDED = [
    ("POST", "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}),
    ("POST", "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}),
    ("POST", "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
    ("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}),
    ("POST", "/tokenize", {"inputs": PROMPT}),
    ("GET", "/v1/models", None),
]
OPEN = ["/health", "/metrics", "/info", "/openapi.json"]
# Two requests in flight at most: the limit tests fill both.
MAX_CONCURRENT = 2


@pytest.fixture(scope="module")
def server():
    launcher = Launcher(
        "--api-key", KEY,
        "--max-total-tokens", "512",
        "--max-concurrent-requests", str(MAX_CONCURRENT),
        "--payload-limit", "100000",
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


def call(server, method, route, body, authorization=None, **kwargs):
    headers = {"Authorization": authorization} if authorization is not None else {}
    return requests.request(method, f"{server.url}{route}", json=body, headers=headers, timeout=120, **kwargs)


def request_count(server) -> float:
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("tgi_request_count"))


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Basic {KEY}", KEY, f"bearer{KEY}"],
    ids=["none", "empty", "scheme-only", "empty-key", "wrong", "prefix", "longer", "basic", "bare-key", "no-space"],
)
@pytest.mark.parametrize("method,route,body", GUARDED, ids=[r for _, r, _ in GUARDED])
def test_wrong_or_missing_key_is_401(server, method, route, body, authorization):
    response = call(server, method, route, body, authorization)
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    message = error["message"] if route.startswith("/v1/") else error
    assert "Unauthorized" in message


@pytest.mark.parametrize("method,route,body", GUARDED, ids=[r for _, r, _ in GUARDED])
def test_right_key_is_served(server, method, route, body):
    response = call(server, method, route, body, f"Bearer {KEY}")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("route", OPEN)
def test_health_metrics_info_stay_open(server, route):
    assert requests.get(f"{server.url}{route}", timeout=10).status_code == 200


def test_rejected_keys_do_no_work(server):
    before = request_count(server)
    for method, route, body in GUARDED:
        assert call(server, method, route, body, "Bearer wrong").status_code == 401
    assert request_count(server) == before


class Listener:
    """A loopback TCP server that records whether anything connected to it."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.socket.settimeout(0.2)
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self):
        self.stopped.set()
        self.thread.join(timeout=5)
        self.socket.close()


def test_requests_cannot_reach_other_hosts_or_read_files(server):
    listener = Listener()
    target = f"http://{listener.address}"
    auth = f"Bearer {KEY}"
    try:
        attempts = [
            # TGI's vision models fetch markdown images of the prompt: a text model must not.
            ("/generate", {"inputs": f"![]({target}/cat.png) {PROMPT}", "parameters": {"max_new_tokens": 1}}),
            ("/v1/chat/completions", {
                "model": target,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"{target}/cat.png"}},
                    {"type": "text", "text": "What is this?"},
                ]}],
                "max_tokens": 1,
            }),
            ("/v1/completions", {"model": f"{target}/model", "prompt": "file:///etc/passwd", "max_tokens": 1}),
            ("/tokenize", {"inputs": "file:///etc/passwd"}),
        ]
        for route, body in attempts:
            response = call(server, "POST", route, body, auth)
            assert response.status_code < 500, response.text
            assert "root:" not in response.text
        # Template syntax in a message is text, not code: nothing is included or run.
        injected = {
            "messages": [{"role": "user", "content": "{% include '/etc/passwd' %}{{ raise_exception('x') }}"}],
            "max_tokens": 1,
        }
        response = call(server, "POST", "/v1/chat/completions", injected, auth)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] < 64
        time.sleep(1)
        assert listener.connections == 0, "the server connected to a host named in a request"
    finally:
        listener.close()


def test_limits_answer_at_once_while_the_server_is_full(server):
    """With every concurrency slot taken by a long stream, over-limit requests are still
    answered within a second: they are refused before they wait for anything."""
    auth = {"Authorization": f"Bearer {KEY}"}
    long_stream = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400, "do_sample": True, "temperature": 100.0, "seed": 1}}
    streams = [
        requests.post(f"{server.url}/generate_stream", json=long_stream, headers=auth, stream=True, timeout=120)
        for _ in range(MAX_CONCURRENT)
    ]
    # The event generators stay referenced: a collected one closes its connection.
    events = [sse_events(response) for response in streams]
    try:
        for response, stream_events in zip(streams, events):
            assert response.status_code == 200, response.text
            next(stream_events)
        over_limits = [
            ({"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}, 429),
            ({"inputs": PROMPT, "parameters": {"stop": ["a"] * 5}}, 422),
            ({"inputs": PROMPT, "parameters": {"top_n_tokens": 6}}, 422),
            ({"inputs": "hello " * 600, "parameters": {"max_new_tokens": 1}}, 422),
            ({"inputs": "a" * 150_000}, 413),
        ]
        for body, status in over_limits:
            started = time.monotonic()
            response = requests.post(f"{server.url}/generate", json=body, headers=auth, timeout=30)
            elapsed = time.monotonic() - started
            assert response.status_code == status, response.text
            assert elapsed < 1.0, f"{status} took {elapsed:.2f}s"
    finally:
        for response in streams:
            response.close()
