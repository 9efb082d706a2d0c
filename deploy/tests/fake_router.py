#!/usr/bin/env python3
"""A stand-in for the router's HTTP surface that the monitoring setup touches, for testing
deploy/prometheus_e2e.sh without a model: GET /health, POST /generate, and GET /metrics in
the Prometheus text format with the router's tgi_* metric names and types.

  fake_router.py [--port N]     (0, the default, picks a free port; the port is printed)
"""
import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DURATION_BUCKETS = (0.01, 0.1, 1.0, 10.0)
TOKEN_BUCKETS = (16.0, 128.0, 1024.0)
GENERATED_TOKENS = 4
REQUEST_SECONDS = 0.05


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0

    def record_request(self):
        with self.lock:
            self.requests += 1

    def exposition(self):
        with self.lock:
            n = self.requests
        lines = []

        def metric(name, kind, samples):
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        def histogram(name, buckets, observed):
            samples = [(f'_bucket{{le="{le}"}}', n if observed <= le else 0) for le in buckets]
            samples += [('_bucket{le="+Inf"}', n), ("_sum", n * observed), ("_count", n)]
            lines.append(f"# TYPE {name} histogram")
            lines.extend(f"{name}{suffix} {value}" for suffix, value in samples)

        metric("tgi_request_count", "counter", [("", n)])
        metric("tgi_request_success", "counter", [("", n)])
        metric("tgi_request_failure", "counter", [('{err="validation"}', 0)])
        metric("tgi_queue_size", "gauge", [("", 0)])
        metric("tgi_batch_current_size", "gauge", [("", 0)])
        metric("tgi_batch_current_max_tokens", "gauge", [("", 0)])
        # Every request's 5-token prompt: its first 4 tokens cached after the first one.
        metric("tgi_prefix_cache_prompt_tokens_total", "counter", [("", 5 * n)])
        metric("tgi_prefix_cache_hit_tokens_total", "counter", [("", 4 * max(n - 1, 0))])
        metric("tgi_prefix_cache_blocks", "gauge", [("", 1)])
        metric("tgi_prefix_cache_evictions_total", "counter", [("", 0)])
        metric("tgi_prefill_chunked_total", "counter", [("", 0)])
        for name in ("tgi_request_duration", "tgi_request_queue_duration",
                     "tgi_request_inference_duration", "tgi_request_mean_time_per_token_duration"):
            histogram(name, DURATION_BUCKETS, REQUEST_SECONDS)
        histogram("tgi_request_input_length", TOKEN_BUCKETS, 5)
        histogram("tgi_request_generated_tokens", TOKEN_BUCKETS, GENERATED_TOKENS)
        lines.append("# TYPE tgi_batch_inference_duration histogram")
        for method in ("prefill", "decode"):
            for le in (*DURATION_BUCKETS, "+Inf"):
                lines.append(f'tgi_batch_inference_duration_bucket{{method="{method}",le="{le}"}} {n}')
            lines.append(f'tgi_batch_inference_duration_sum{{method="{method}"}} {n * 0.01}')
            lines.append(f'tgi_batch_inference_duration_count{{method="{method}"}} {n}')
        return "\n".join(lines) + "\n"


def handler_for(counters):
    class Handler(BaseHTTPRequestHandler):
        def reply(self, status, body, content_type):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/metrics":
                self.reply(200, counters.exposition(), "text/plain; version=0.0.4")
            elif self.path == "/health":
                self.reply(200, "", "text/plain")
            else:
                self.reply(404, "not found", "text/plain")

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except json.JSONDecodeError:
                body = None
            if self.path != "/generate":
                self.reply(404, "not found", "text/plain")
            elif not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
                self.reply(422, json.dumps({"error": "inputs must be a string",
                                            "error_type": "validation"}), "application/json")
            else:
                counters.record_request()
                self.reply(200, json.dumps({"generated_text": " Paris."}), "application/json")

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(Counters()))
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
