#!/usr/bin/env python3
"""End-to-end test of the monitoring setup against a router (see prometheus_e2e.sh).

The router is one already running at ROUTER_URL, or, with --launch MODEL, a
text-generation-launcher started here with the Kubernetes settings (kubernetes/tgi.env)
made local: the model given, loopback, a free port, the CPU, a temporary cache.
Starts a real Prometheus server on loopback with deploy/prometheus/rules.yml and a scrape
job for the router, sends a few /generate requests to the router, then through the
Prometheus HTTP API checks that:
  - the router's scrape target is up and the required tgi_* metrics were ingested,
  - tgi_request_count counts the requests sent,
  - every query of the Grafana dashboard evaluates without error,
  - the Prometheus adapter's query behind the HPA returns tgi_queue_size per pod,
  - every recording and alerting rule evaluates without error,
and, with --launch, that the launcher stops on SIGTERM within the pod's grace period.
"""
import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from deploy_checks import GRAFANA_VARIABLES, dashboard_queries  # noqa: E402

DEPLOY = Path(__file__).resolve().parent.parent
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
ADAPTER_CONFIG = DEPLOY / "kubernetes" / "prometheus-adapter" / "config.yaml"
LAUNCHER_SETTINGS = DEPLOY / "kubernetes" / "tgi.env"
DEPLOYMENT = DEPLOY / "kubernetes" / "deployment.yaml"
LAUNCHER = DEPLOY.parent / "target" / "release" / "text-generation-launcher"
LAUNCH_TIMEOUT_S = 600
# The GPU settings of tgi.env made fit for a CPU: warming up with their 8192-token prefill
# takes longer than the test may wait.
CPU_SETTINGS = {"DEVICE": "cpu", "DTYPE": "float32", "MAX_INPUT_TOKENS": "256",
                "MAX_TOTAL_TOKENS": "512", "MAX_BATCH_PREFILL_TOKENS": "512"}
# Labels the Kubernetes scrape attaches (ServiceMonitor), so the adapter's query can match.
POD_LABELS = {"namespace": "e2e", "pod": "tgi-e2e-0"}


class Failure(Exception):
    pass


def http_json(url, data=None, headers=None, timeout=30):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, probe, timeout_s):
    """Polls probe() until it returns a truthy value; raises Failure after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            last_error = e
        time.sleep(0.5)
    raise Failure(f"timed out after {timeout_s}s waiting for {what}"
                  + (f" (last error: {last_error})" if last_error else ""))


class Prometheus:
    def __init__(self, binary, router, workdir, scrape_interval_s):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{scrape_interval_s}s",
                       "evaluation_interval": f"{scrape_interval_s}s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "tgi",
                "scheme": router.scheme,
                "metrics_path": router.path.rstrip("/") + "/metrics",
                "static_configs": [{"targets": [router.netloc], "labels": POD_LABELS}],
            }],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self):
        return "\n".join(self.log_path.read_text().splitlines()[-20:])

    def api(self, path, **params):
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = http_json(url)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise Failure(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def ready(self):
        if self.process.poll() is not None:
            raise Failure(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
        with urllib.request.urlopen(f"{self.base}/-/ready", timeout=5) as r:
            return r.status == 200


class LocalLauncher:
    """The launcher with the Deployment's settings, made to run on this machine."""

    def __init__(self, binary, model, workdir):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = dict(line.split("=", 1) for line in LAUNCHER_SETTINGS.read_text().splitlines()
                        if line.strip() and not line.startswith("#"))
        self.drain_s = int(settings.get("GRACEFUL_TERMINATION_TIMEOUT", 90))
        pod = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
        self.grace_s = pod.get("terminationGracePeriodSeconds", 30)
        settings.update({
            "MODEL_ID": str(model), "HOSTNAME": "127.0.0.1", "PORT": str(self.port),
            "HF_HUB_OFFLINE": "1", "SHARD_UDS_PATH": str(workdir / "shard"),
            "HUGGINGFACE_HUB_CACHE": str(workdir / "cache"), "HF_HOME": str(workdir / "cache"),
            **CPU_SETTINGS,
        })
        self.log_path = workdir / "launcher.log"
        self.process = subprocess.Popen([binary], env={**os.environ, **settings},
                                        stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)

    def log_tail(self):
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def healthy(self):
        if self.process.poll() is not None:
            raise Failure(f"launcher exited with {self.process.returncode}:\n{self.log_tail()}")
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
            return r.status == 200

    def stop_within_grace(self):
        """SIGTERM, as the kubelet sends; the launcher must be gone before the SIGKILL."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise Failure(f"launcher still running {self.grace_s}s after SIGTERM "
                          f"(terminationGracePeriodSeconds):\n{self.log_tail()}")
        if code != 0:
            raise Failure(f"launcher exited with {code} after SIGTERM:\n{self.log_tail()}")
        print(f"launcher stopped {time.monotonic() - started:.1f}s after SIGTERM")

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def send_requests(router_url, count, api_key):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body = json.dumps({"inputs": "The capital of France is",
                       "parameters": {"max_new_tokens": 4}}).encode()
    for _ in range(count):
        reply = http_json(router_url.rstrip("/") + "/generate", data=body, headers=headers,
                          timeout=120)
        if not isinstance(reply.get("generated_text"), str):
            raise Failure(f"/generate answered {reply}")


def adapter_query(series, pod_labels):
    """The HPA's metric query as the Prometheus adapter renders it for one pod."""
    rules = yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]
    rule = next(r for r in rules if r["name"]["as"] == series)
    matchers = ",".join(f'{k}="{v}"' for k, v in pod_labels.items())
    return (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod"))


def run_checks(prom, args):
    results = []

    def check(name, fn):
        try:
            fn()
            results.append((name, None))
        except Failure as e:
            results.append((name, str(e)))

    def target_up():
        wait_for("a successful scrape of the router",
                 lambda: [r for r in prom.query('up{job="tgi"}') if r["value"][1] == "1"],
                 args.timeout)

    def metrics_ingested():
        for metric in args.require:
            wait_for(f"{metric} in Prometheus", lambda m=metric: prom.query(m), args.timeout)

    def request_count():
        wait_for(f"tgi_request_count >= {args.requests}",
                 lambda: prom.query(f"sum(tgi_request_count) >= {args.requests}"), args.timeout)

    def dashboard_queries_evaluate():
        queries = []
        for title, expr in dashboard_queries(json.loads(DASHBOARD.read_text())):
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((title, expr))
        # rate() needs two scrapes after the requests: wait for the first panel to show them.
        wait_for("data for the first dashboard panel", lambda: prom.query(queries[0][1]),
                 args.timeout)
        with_data = set()
        for title, expr in queries:
            try:
                if prom.query(expr):
                    with_data.add(title)
            except Failure as e:
                raise Failure(f"panel {title!r}: {e}")
        # Not a failure: a metric the router records only under some traffic stays empty.
        for title in sorted({title for title, _ in queries} - with_data):
            print(f"NOTE: dashboard panel {title!r} shows no data (yet)")

    def autoscaler_query():
        expr = adapter_query("tgi_queue_size", POD_LABELS)
        result = wait_for(f"a result for {expr}", lambda: prom.query(expr), args.timeout)
        if result[0]["metric"].get("pod") != POD_LABELS["pod"]:
            raise Failure(f"{expr} answered {result}, not a value for pod {POD_LABELS['pod']}")

    def rules_evaluate():
        def evaluated():
            groups = prom.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            # Prometheus reports the zero time for a rule not evaluated yet.
            done = all(not r.get("lastEvaluation", "0001").startswith("0001") for r in rules)
            return rules if rules and done else None
        rules = wait_for("one evaluation of every rule", evaluated, args.timeout)
        broken = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
        if broken:
            raise Failure("rules failing: " + "; ".join(broken))

    check("router target is up", target_up)
    check("required tgi_* metrics ingested", metrics_ingested)
    check("tgi_request_count counts the requests sent", request_count)
    check("every dashboard query evaluates", dashboard_queries_evaluate)
    check("autoscaler (prometheus-adapter) query answers per pod", autoscaler_query)
    check("recording and alerting rules evaluate", rules_evaluate)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("router_url", nargs="?",
                        help="router base URL on loopback, e.g. http://127.0.0.1:3000")
    target.add_argument("--launch", metavar="MODEL", type=Path,
                        help="start the launcher with kubernetes/tgi.env, serving MODEL")
    parser.add_argument("--launcher", default=str(LAUNCHER), help="launcher binary for --launch")
    parser.add_argument("--requests", type=int, default=2, help="/generate requests to send")
    parser.add_argument("--require", nargs="+",
                        default=["tgi_request_count", "tgi_request_success", "tgi_queue_size",
                                 "tgi_request_duration_bucket",
                                 "tgi_request_generated_tokens_sum"],
                        help="metrics that must be ingested")
    parser.add_argument("--api-key", default=None, help="bearer token for /generate")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait per check")
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prometheus-e2e-") as workdir:
        return run(args, Path(workdir))


def run(args, workdir):
    launcher = None
    if args.launch:
        if not Path(args.launcher).is_file():
            sys.exit(f"error: {args.launcher} is missing: run `cargo build --release` first")
        launcher = LocalLauncher(args.launcher, args.launch.resolve(), workdir)
        args.router_url = launcher.url
    router = urllib.parse.urlsplit(args.router_url)
    if router.scheme not in ("http", "https") or not router.hostname:
        sys.exit(f"error: {args.router_url!r} is not an http(s) URL")
    if not is_loopback(router.hostname):
        sys.exit(f"error: {router.hostname} is not a loopback address")

    prom = None
    try:
        try:
            if launcher:
                try:
                    wait_for("the launcher's /health", launcher.healthy, LAUNCH_TIMEOUT_S)
                except Failure as e:
                    raise Failure(f"{e}\n{launcher.log_tail()}")
            send_requests(args.router_url, args.requests, args.api_key)
            prom = Prometheus(args.prometheus, router, workdir, scrape_interval_s=1)
            wait_for("prometheus to become ready", prom.ready, args.timeout)
            results = run_checks(prom, args)
        except (OSError, urllib.error.URLError, ValueError, Failure) as e:
            results = [("router and prometheus start", str(e))]
        finally:
            if prom:
                prom.stop()
        if launcher and launcher.process.poll() is None:
            check = "launcher stops on SIGTERM within the grace period"
            try:
                launcher.stop_within_grace()
                results.append((check, None))
            except Failure as e:
                results.append((check, str(e)))
    finally:
        if launcher:
            launcher.kill()

    failed = [r for r in results if r[1]]
    for name, error in results:
        print(f"{'FAIL' if error else 'PASS'}: {name}" + (f": {error}" if error else ""))
    if failed and prom:
        print(f"prometheus log (tail):\n{prom.log_tail()}", file=sys.stderr)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
