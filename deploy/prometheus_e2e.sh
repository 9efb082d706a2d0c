#!/usr/bin/env bash
# End-to-end test of the monitoring setup against a running router: a real Prometheus
# server scrapes it, then the test queries Prometheus for the tgi_* metrics, the dashboard's
# queries, the autoscaler's query and the alert rules (deploy/tools/prometheus_e2e.py).
#
#   ROUTER_URL=http://127.0.0.1:3000 deploy/prometheus_e2e.sh [options]
#   deploy/prometheus_e2e.sh http://127.0.0.1:3000 [--requests N] [--api-key KEY]
#   deploy/prometheus_e2e.sh --launch MODEL   # starts target/release/text-generation-launcher
#                                             # with kubernetes/tgi.env, on the CPU
#   deploy/prometheus_e2e.sh --fake           # against deploy/tests/fake_router.py (self-test)
#
# Loopback addresses only. Installs Debian's prometheus and PyYAML when missing.
set -euo pipefail
deploy=$(cd "$(dirname "$0")" && pwd)

if ! command -v prometheus >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q --disable-pip-version-check pyyaml

if [ "${1:-}" = "--fake" ]; then
  shift
  port_file=$(mktemp)
  python3 "$deploy/tests/fake_router.py" >"$port_file" &
  fake_pid=$!
  trap 'kill "$fake_pid" 2>/dev/null || true; rm -f "$port_file"' EXIT
  for _ in $(seq 50); do [ -s "$port_file" ] && break; sleep 0.1; done
  [ -s "$port_file" ] || { echo "error: fake router did not start" >&2; exit 1; }
  set -- "http://127.0.0.1:$(head -1 "$port_file")" "$@"
elif [ -n "${ROUTER_URL:-}" ] && { [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; }; then
  set -- "$ROUTER_URL" "$@"
fi
python3 "$deploy/tools/prometheus_e2e.py" "$@"
