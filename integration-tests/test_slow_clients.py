"""Clients that misbehave without sending anything wrong: one that stops reading its
stream, and a thousand that open a connection and send nothing. Neither slows the
streams of the others nor stops the server answering."""

import json
import resource
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from launcher_harness import Launcher

STREAMS = 16
NEW_TOKENS = 24
IDLE_CONNECTIONS = 1000


def stream_gaps(url: str) -> list[float]:
    """Seconds between the token events of one streamed request."""
    body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": NEW_TOKENS, "do_sample": True, "temperature": 100.0, "seed": 1}}
    response = requests.post(f"{url}/generate_stream", json=body, stream=True, timeout=120)
    assert response.status_code == 200, response.text
    arrivals = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            json.loads(line[len("data:"):])
            arrivals.append(time.monotonic())
    assert len(arrivals) == NEW_TOKENS
    return [b - a for a, b in zip(arrivals, arrivals[1:])]


def median_gap(url: str) -> float:
    with ThreadPoolExecutor(max_workers=STREAMS) as pool:
        gaps = [gap for stream in pool.map(lambda _: stream_gaps(url), range(STREAMS)) for gap in stream]
    return statistics.median(gaps)


def non_reading_stream(port: int) -> socket.socket:
    """A streaming request whose client never reads the answer."""
    body = json.dumps({"inputs": "Tell me a story", "parameters": {"max_new_tokens": 400, "do_sample": True, "temperature": 100.0}})
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.sendall(
        f"POST /generate_stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode()
    )
    return client


def test_a_non_reading_client_and_idle_connections_do_not_slow_the_others():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * IDLE_CONNECTIONS)), hard))
    launcher = Launcher("--header-timeout", "120")
    launcher.wait_healthy()
    try:
        alone = median_gap(launcher.url)

        stalled = non_reading_stream(launcher.port)
        idle = [socket.create_connection(("127.0.0.1", launcher.port)) for _ in range(IDLE_CONNECTIONS)]
        asked = time.monotonic()
        assert requests.get(f"{launcher.url}/health", timeout=5).status_code == 200
        health_s = time.monotonic() - asked
        beside = median_gap(launcher.url)
        print(f"median inter-token gap of {STREAMS} streams: {alone * 1e3:.1f} ms alone, "
              f"{beside * 1e3:.1f} ms beside a non-reading stream and {IDLE_CONNECTIONS} idle connections; "
              f"/health took {health_s * 1e3:.0f} ms")
        assert beside < 2 * alone, (alone, beside)
        assert health_s < 1, health_s
        for connection in [stalled, *idle]:
            connection.close()
    finally:
        launcher.stop()
