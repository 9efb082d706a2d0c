#!/usr/bin/env python3
"""Consistency checks across the deployment files that no schema can express.

Schemas say each manifest is well formed; these say they fit together and fit the
server: the Service reaches the pod's port, probes hit /health, the grace period covers
the launcher's drain, the HPA's metric is one the Prometheus adapter serves, the
dashboard only charts tgi_* metrics, both images keep the same operator contract.

  deploy_checks.py manifests RENDERED_APP.yaml RENDERED_ADAPTER.yaml
  deploy_checks.py dashboard DASHBOARD.json RULES_OUT.yml
  deploy_checks.py dockerfile DOCKERFILE...

Each prints the problems found and exits 1 if there are any. `dashboard` also writes the
dashboard's queries as a Prometheus rules file, for promtool to parse the PromQL.
"""
import json
import re
import shlex
import sys
from pathlib import Path

import yaml

# Seconds of startup (model download and load) the startup probe must allow at least.
MIN_STARTUP_BUDGET_S = 600
# Margin past the launcher's drain for the shards and the router to exit.
MIN_SHUTDOWN_MARGIN_S = 10
# Substitutes for Grafana's variables so that the dashboard queries parse as PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def by_kind(documents):
    resources = {}
    for doc in documents:
        resources.setdefault(doc["kind"], []).append(doc)
    return resources


def one(resources, kind, errors):
    found = resources.get(kind, [])
    if len(found) != 1:
        errors.append(f"expected exactly one {kind}, found {len(found)}")
        return None
    return found[0]


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def prestop_sleep_s(container):
    command = (container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
               .get("command", []))
    return int(command[1]) if len(command) == 2 and command[0] == "sleep" else 0


def check_probes(container, port_names):
    errors = []
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container.get(probe, {}).get("httpGet")
        if get is None:
            errors.append(f"container {container['name']}: no {probe} with httpGet")
            continue
        if get.get("path") != "/health":
            errors.append(f"{probe} path is {get.get('path')!r}, not /health")
        if get.get("port") not in port_names:
            errors.append(f"{probe} port {get.get('port')!r} is not a container port")
    startup = container.get("startupProbe", {})
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if budget < MIN_STARTUP_BUDGET_S:
        errors.append(f"startupProbe allows {budget}s for model loading, "
                      f"less than {MIN_STARTUP_BUDGET_S}s")
    return errors


def check_gpu(container):
    resources = container.get("resources", {})
    requested = resources.get("requests", {}).get("nvidia.com/gpu")
    limited = resources.get("limits", {}).get("nvidia.com/gpu")
    if limited is None or int(limited) < 1:
        return ["container has no nvidia.com/gpu limit"]
    if requested is not None and requested != limited:
        return [f"nvidia.com/gpu request {requested} differs from limit {limited}"]
    return []


def adapter_metric_names(adapter_docs):
    """Metric names the Prometheus adapter's rules serve, from its config.yaml ConfigMap."""
    names = set()
    for config_map in adapter_docs:
        for text in config_map.get("data", {}).values():
            for rule in yaml.safe_load(text).get("rules", []):
                names.add(rule.get("name", {}).get("as") or rule["seriesQuery"].split("{")[0])
    return names


def check_manifests(app_docs, adapter_docs):
    errors = []
    resources = by_kind(app_docs)
    deployment = one(resources, "Deployment", errors)
    service = one(resources, "Service", errors)
    if deployment is None or service is None:
        return errors
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    if not selects(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        errors.append("Deployment selector does not match its pod labels")
    container = pod["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}

    config = {}
    config_maps = {c["metadata"]["name"]: c for c in resources.get("ConfigMap", [])}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref is None:
            continue
        if ref["name"] not in config_maps:
            errors.append(f"envFrom ConfigMap {ref['name']} is not among the manifests")
        else:
            config.update(config_maps[ref["name"]].get("data", {}))
    if not config:
        errors.append("the container takes no settings from a ConfigMap")
    explicit_env = {e["name"]: e.get("value") for e in container.get("env", [])}
    port = explicit_env.get("PORT", config.get("PORT"))
    if not str(port).isdigit() or int(port) not in port_names.values():
        errors.append(f"launcher PORT {port} is not a container port {sorted(port_names.values())}")
    if explicit_env.get("HOSTNAME", config.get("HOSTNAME")) != "0.0.0.0":
        errors.append("HOSTNAME is not set to 0.0.0.0 (Kubernetes sets it to the pod name)")

    errors += check_probes(container, port_names)
    errors += check_gpu(container)

    drain = config.get("GRACEFUL_TERMINATION_TIMEOUT", "90")
    if not drain.isdigit():
        errors.append(f"GRACEFUL_TERMINATION_TIMEOUT {drain!r} is not a number of seconds")
        drain = "90"
    drain = int(drain)
    needed = drain + prestop_sleep_s(container) + MIN_SHUTDOWN_MARGIN_S
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if grace < needed:
        errors.append(f"terminationGracePeriodSeconds {grace} < {needed} (launcher drain "
                      f"{drain}s + preStop + {MIN_SHUTDOWN_MARGIN_S}s margin)")

    claims = {c["metadata"]["name"] for c in resources.get("PersistentVolumeClaim", [])}
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None:
            errors.append(f"volumeMount {mount['name']} has no volume")
        elif "persistentVolumeClaim" in volume and \
                volume["persistentVolumeClaim"]["claimName"] not in claims:
            errors.append(f"volume {mount['name']} claims a PVC that is not among the manifests")
    cache_dir = config.get("HUGGINGFACE_HUB_CACHE")
    cache_mount = next((m for m in container.get("volumeMounts", [])
                        if m["mountPath"] == cache_dir), None)
    if cache_mount is None or "persistentVolumeClaim" not in volumes.get(cache_mount["name"], {}):
        errors.append(f"HUGGINGFACE_HUB_CACHE {cache_dir} is not on a PersistentVolumeClaim")

    if not selects(service["spec"].get("selector"), pod_labels):
        errors.append("Service selector does not match the pod labels")
    service_ports = {p.get("name") for p in service["spec"]["ports"]}
    for p in service["spec"]["ports"]:
        if p.get("targetPort") not in port_names and p.get("targetPort") not in port_names.values():
            errors.append(f"Service port {p.get('name')} targets no container port")

    for monitor in resources.get("ServiceMonitor", []):
        if not selects(monitor["spec"]["selector"].get("matchLabels"),
                       service["metadata"].get("labels", {})):
            errors.append(f"ServiceMonitor {monitor['metadata']['name']} does not select the Service")
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint.get("port") not in service_ports:
                errors.append(f"ServiceMonitor port {endpoint.get('port')} is not a Service port")
            if endpoint.get("path", "/metrics") != "/metrics":
                errors.append("ServiceMonitor does not scrape /metrics")

    served = adapter_metric_names(adapter_docs)
    for hpa in resources.get("HorizontalPodAutoscaler", []):
        target = hpa["spec"]["scaleTargetRef"]
        if (target["kind"], target["name"]) != ("Deployment", deployment["metadata"]["name"]):
            errors.append(f"HPA {hpa['metadata']['name']} does not scale the Deployment")
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] != "Pods":
                continue
            name = metric["pods"]["metric"]["name"]
            if not name.startswith("tgi_"):
                errors.append(f"HPA scales on {name}, not a tgi_* metric")
            if name not in served:
                errors.append(f"HPA metric {name} is not served by the Prometheus adapter "
                              f"(serves {sorted(served)})")
    return errors


def dashboard_queries(dashboard):
    """(panel title, expr) of every target, panels nested in rows included."""
    queries = []
    for panel in dashboard.get("panels", []):
        for inner in [panel] + panel.get("panels", []):
            for target in inner.get("targets", []):
                queries.append((inner.get("title", "?"), target.get("expr", "")))
    return queries


def check_dashboard(dashboard):
    errors = []
    panels = dashboard.get("panels", [])
    if not panels:
        errors.append("dashboard has no panels")
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)):
        errors.append("panel ids are not unique")
    for panel in panels:
        if panel.get("type") != "row" and not panel.get("targets"):
            errors.append(f"panel {panel.get('title')!r} has no queries")
    for title, expr in dashboard_queries(dashboard):
        if not re.search(r"\btgi_\w+", expr):
            errors.append(f"panel {title!r}: query {expr!r} charts no tgi_* metric")
    return errors


def dashboard_rules(dashboard):
    """The dashboard's queries as recording rules, so that promtool parses their PromQL."""
    rules = []
    for n, (_, expr) in enumerate(dashboard_queries(dashboard)):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    return {"groups": [{"name": "dashboard", "rules": rules}]}


def final_stage(dockerfile_text):
    """Instructions of the last build stage as (INSTRUCTION, arguments), continuations joined."""
    joined = re.sub(r"\\\n", " ", dockerfile_text)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            instructions = []
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def check_dockerfile(text):
    """The runtime contract operators and the Kubernetes manifests rely on."""
    errors = []
    stage = final_stage(text)
    args = {}
    for keyword, rest in stage:
        args.setdefault(keyword, []).append(rest)
    if args.get("ENTRYPOINT") != ['["text-generation-launcher"]']:
        errors.append(f"ENTRYPOINT is {args.get('ENTRYPOINT')}, not [\"text-generation-launcher\"]")
    env = {}
    for rest in args.get("ENV", []):
        env.update(item.split("=", 1) for item in shlex.split(rest) if "=" in item)
    for name, value in {"PORT": "80", "HOSTNAME": "0.0.0.0",
                        "HUGGINGFACE_HUB_CACHE": "/data"}.items():
        if env.get(name) != value:
            errors.append(f"ENV {name} is {env.get(name)!r}, not {value!r}")
    if "80" not in " ".join(args.get("EXPOSE", [])).split():
        errors.append("port 80 is not EXPOSEd")
    if args.get("VOLUME") != ["/data"]:
        errors.append(f"VOLUME is {args.get('VOLUME')}, not /data")
    if not any("/health" in h for h in args.get("HEALTHCHECK", [])):
        errors.append("no HEALTHCHECK on /health")
    copied = " ".join(args.get("COPY", []))
    built = re.findall(r"target/release/(text-generation-\w+)", text)
    for binary in ("text-generation-launcher", "text-generation-router", "text-generation-shard"):
        if binary not in built:
            errors.append(f"{binary} is not taken from the build")
    if "/usr/local/bin" not in copied:
        errors.append("the binaries are not copied onto the PATH (/usr/local/bin)")
    return errors


def load_yaml_documents(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    command, paths = argv[1], argv[2:]
    try:
        errors = run(command, paths)
    except (OSError, ValueError, KeyError, TypeError, IndexError, yaml.YAMLError) as e:
        # Schemas are checked first; this is for files that are not even well formed.
        errors = [f"cannot check {' '.join(paths)}: {type(e).__name__}: {e}"]
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


def run(command, paths):
    if command == "manifests" and len(paths) == 2:
        errors = check_manifests(load_yaml_documents(paths[0]), load_yaml_documents(paths[1]))
    elif command == "dashboard" and len(paths) == 2:
        dashboard = json.loads(Path(paths[0]).read_text())
        errors = check_dashboard(dashboard)
        Path(paths[1]).write_text(yaml.safe_dump(dashboard_rules(dashboard), sort_keys=False))
    elif command == "dockerfile" and paths:
        errors = [f"{p}: {e}" for p in paths for e in check_dockerfile(Path(p).read_text())]
    else:
        sys.exit(__doc__)
    return errors


if __name__ == "__main__":
    sys.exit(main(sys.argv))
