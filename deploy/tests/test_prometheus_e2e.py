"""Unit tests of the pure parts of deploy/tools/prometheus_e2e.py (the whole test runs
against the fake router in deploy/check.sh)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import prometheus_e2e  # noqa: E402


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
    ("127.evil.example", False), ("10.0.0.1", False), ("192.168.1.1", False), ("example.com", False),
])
def test_only_loopback_targets_are_accepted(host, loopback):
    assert prometheus_e2e.is_loopback(host) is loopback


def test_adapter_query_is_rendered_for_one_pod():
    expr = prometheus_e2e.adapter_query("tgi_queue_size", {"namespace": "ns", "pod": "p-0"})
    assert expr == 'sum(avg_over_time(tgi_queue_size{namespace="ns",pod="p-0"}[1m])) by (pod)'
