"""Unit tests of deploy/tools/deploy_checks.py: the shipped files pass, and each kind of
inconsistency the checks exist for is reported.

Needs the rendered manifests; deploy/check.sh renders them and passes their paths in
RENDERED_APP and RENDERED_ADAPTER (or run `kubectl kustomize` yourself).
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(DEPLOY / "tools"))
import deploy_checks  # noqa: E402


def render(directory, env_var):
    if os.environ.get(env_var):
        return Path(os.environ[env_var]).read_text()
    return subprocess.run(["kubectl", "kustomize", str(DEPLOY / "kubernetes" / directory)],
                          check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def rendered():
    app = [d for d in yaml.safe_load_all(render("", "RENDERED_APP")) if d]
    adapter = [d for d in yaml.safe_load_all(render("prometheus-adapter", "RENDERED_ADAPTER")) if d]
    return app, adapter


def find(docs, kind):
    return next(d for d in docs if d["kind"] == kind)


def container_of(docs):
    return find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_shipped_manifests_are_consistent(rendered):
    assert deploy_checks.check_manifests(*rendered) == []


def mutated(rendered, change):
    app, adapter = copy.deepcopy(rendered)
    change(app, adapter)
    return deploy_checks.check_manifests(app, adapter)


def set_grace(app, _):
    find(app, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 60


def break_service_selector(app, _):
    find(app, "Service")["spec"]["selector"] = {"app.kubernetes.io/name": "other"}


def probe_wrong_path(app, _):
    container_of(app)["livenessProbe"]["httpGet"]["path"] = "/"


def short_startup(app, _):
    container_of(app)["startupProbe"]["failureThreshold"] = 3


def drop_gpu(app, _):
    del container_of(app)["resources"]["limits"]["nvidia.com/gpu"]


def hpa_unknown_metric(app, _):
    find(app, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"] = \
        "tgi_batch_current_size"


def monitor_wrong_port(app, _):
    find(app, "ServiceMonitor")["spec"]["endpoints"][0]["port"] = "metrics"


def config_port_mismatch(app, _):
    find(app, "ConfigMap")["data"]["PORT"] = "8080"


def drop_hostname(app, _):
    container_of(app)["env"] = []


def cache_off_pvc(app, _):
    find(app, "ConfigMap")["data"]["HUGGINGFACE_HUB_CACHE"] = "/tmp"


@pytest.mark.parametrize("change, message", [
    (set_grace, "terminationGracePeriodSeconds 60"),
    (break_service_selector, "Service selector does not match"),
    (probe_wrong_path, "livenessProbe path is '/'"),
    (short_startup, "startupProbe allows 30s"),
    (drop_gpu, "no nvidia.com/gpu limit"),
    (hpa_unknown_metric, "HPA metric tgi_batch_current_size is not served"),
    (monitor_wrong_port, "ServiceMonitor port metrics is not a Service port"),
    (config_port_mismatch, "launcher PORT 8080 is not a container port"),
    (drop_hostname, "HOSTNAME is not set to 0.0.0.0"),
    (cache_off_pvc, "HUGGINGFACE_HUB_CACHE /tmp is not on a PersistentVolumeClaim"),
])
def test_inconsistency_is_reported(rendered, change, message):
    errors = mutated(rendered, change)
    assert any(message in e for e in errors), errors


def shipped_dashboard():
    return json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())


def test_shipped_dashboard_passes():
    assert deploy_checks.check_dashboard(shipped_dashboard()) == []


def test_dashboard_query_without_tgi_metric_is_reported():
    dashboard = shipped_dashboard()
    dashboard["panels"][0]["targets"][0]["expr"] = "sum(rate(http_requests_total[5m]))"
    errors = deploy_checks.check_dashboard(dashboard)
    assert any("charts no tgi_* metric" in e for e in errors), errors


def test_dashboard_rules_substitute_grafana_variables():
    rules = deploy_checks.dashboard_rules(shipped_dashboard())["groups"][0]["rules"]
    assert rules and all("$" not in r["expr"] for r in rules)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_shipped_dockerfiles_keep_the_contract(name):
    assert deploy_checks.check_dockerfile((DEPLOY / name).read_text()) == []


def test_dockerfile_contract_reads_only_the_final_stage():
    # The runtime settings in an earlier stage do not reach an image built FROM scratch.
    text = (DEPLOY / "Dockerfile.cpu").read_text() + "\nFROM scratch\n"
    errors = deploy_checks.check_dockerfile(text)
    assert any("ENTRYPOINT" in e for e in errors)
    assert any("VOLUME" in e for e in errors)


def non_numeric_settings(app, _):
    find(app, "ConfigMap")["data"].update(PORT="http", GRACEFUL_TERMINATION_TIMEOUT="1m")


def test_non_numeric_settings_are_reported_not_raised(rendered):
    errors = mutated(rendered, non_numeric_settings)
    assert any("launcher PORT http" in e for e in errors), errors
    assert any("GRACEFUL_TERMINATION_TIMEOUT '1m'" in e for e in errors), errors


def test_malformed_manifest_is_an_error_not_a_traceback(tmp_path, capsys):
    app = tmp_path / "app.yaml"
    app.write_text("kind: Deployment\nmetadata: {name: x}\n---\nkind: Service\n")
    adapter = tmp_path / "adapter.yaml"
    adapter.write_text("")
    assert deploy_checks.main(["deploy_checks.py", "manifests", str(app), str(adapter)]) == 1
    assert "error: cannot check" in capsys.readouterr().err
