#!/usr/bin/env python3
"""Writes deploy/grafana/dashboard.json, the Grafana dashboard over the router's tgi_* metrics.

The panels are described once below and expanded into Grafana's JSON model, so the
dashboard stays consistent (same datasource, instance filter and layout everywhere).
Regenerate after editing:  python3 deploy/grafana/generate_dashboard.py
deploy/check.sh fails when dashboard.json differs from what this script writes.
"""
import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).with_name("dashboard.json")

# Every query is filtered by the dashboard's instance variable.
SEL = '{instance=~"$instance"}'
RATE = "$__rate_interval"


def quantiles(metric, qs=(0.5, 0.9, 0.99), by=""):
    """histogram_quantile targets over one tgi_* histogram, one per quantile."""
    group = f"le, {by}" if by else "le"
    series = f" {{{{{by}}}}}" if by else ""  # Grafana legend template: {{method}}
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{SEL}[{RATE}])))",
            f"p{round(q * 100)}{series}",
        )
        for q in qs
    ]


# (title, unit, [(expr, legend)], description)
PANELS = [
    ("Request rate", "reqps",
     [(f"sum(rate(tgi_request_count{SEL}[{RATE}]))", "requests")],
     "Requests received per second."),
    ("Success and failure rate", "reqps",
     [(f"sum(rate(tgi_request_success{SEL}[{RATE}]))", "success"),
      (f"sum by (err) (rate(tgi_request_failure{SEL}[{RATE}]))", "failure {{err}}")],
     "Finished requests per second; failures by error kind."),
    ("Request latency", "s", quantiles("tgi_request_duration"),
     "End-to-end request duration percentiles (queue + inference)."),
    ("Queue size", "short",
     [(f"sum by (instance) (tgi_queue_size{SEL})", "{{instance}}")],
     "Requests waiting for a batch slot; the autoscaler's metric."),
    ("Batch size", "short",
     [(f"sum by (instance) (tgi_batch_current_size{SEL})", "requests {{instance}}")],
     "Requests in the running batch."),
    ("Batch max tokens", "short",
     [(f"sum by (instance) (tgi_batch_current_max_tokens{SEL})", "tokens {{instance}}")],
     "KV-cache tokens the running batch may reach."),
    ("Generated tokens per second", "short",
     [(f"sum(rate(tgi_request_generated_tokens_sum{SEL}[{RATE}]))", "tokens/s")],
     "Output throughput, counted as requests finish."),
    ("Mean time per token", "s", quantiles("tgi_request_mean_time_per_token_duration"),
     "Per-request mean decode time per generated token."),
    ("Queue duration", "s", quantiles("tgi_request_queue_duration"),
     "Time requests wait before their prefill."),
    ("Inference duration", "s", quantiles("tgi_request_inference_duration"),
     "Time from prefill to the last token."),
    # The mean (from _sum and _count) also shows when the metric is exported as a summary.
    ("Batch forward duration", "s",
     [(f"sum by (method) (rate(tgi_batch_inference_duration_sum{SEL}[{RATE}]))"
       f" / sum by (method) (rate(tgi_batch_inference_duration_count{SEL}[{RATE}]))",
       "mean {{method}}")]
     + quantiles("tgi_batch_inference_duration", qs=(0.99,), by="method"),
     "Duration of one prefill or decode step of the batch."),
    ("Input length", "short", quantiles("tgi_request_input_length"),
     "Prompt length in tokens."),
    ("Prefix cache hit rate", "percentunit",
     [(f"sum(rate(tgi_prefix_cache_hit_tokens_total{SEL}[{RATE}]))"
       f" / sum(rate(tgi_prefix_cache_prompt_tokens_total{SEL}[{RATE}]))", "hit rate")],
     "Share of the prompt tokens whose KV blocks were cached (not prefilled again)."),
    ("Prefix cache blocks and evictions", "short",
     [(f"sum by (instance) (tgi_prefix_cache_blocks{SEL})", "cached blocks {{instance}}"),
      (f"sum(rate(tgi_prefix_cache_evictions_total{SEL}[{RATE}]))", "evictions/s")],
     "KV blocks held by the prefix cache, and cached blocks evicted per second."),
    ("Chunked prefills", "reqps",
     [(f"sum(rate(tgi_prefill_chunked_total{SEL}[{RATE}]))", "chunked prompts/s")],
     "Prompts prefilled over several steps (longer than the step's prefill budget left)."),
]

PANEL_WIDTH, PANEL_HEIGHT, COLUMNS = 12, 8, 2
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def panel(index, title, unit, targets, description):
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {
            "h": PANEL_HEIGHT,
            "w": PANEL_WIDTH,
            "x": (index % COLUMNS) * PANEL_WIDTH,
            "y": (index // COLUMNS) * PANEL_HEIGHT,
        },
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + n), "datasource": DATASOURCE, "expr": expr,
             "legendFormat": legend}
            for n, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard():
    return {
        "uid": "tgi-overview",
        "title": "Text Generation Inference",
        "tags": ["tgi", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus"},
            {"name": "instance", "label": "Instance", "type": "query",
             "datasource": DATASOURCE, "query": "label_values(tgi_request_count, instance)",
             "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


def render():
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--check"]):
        sys.exit("usage: generate_dashboard.py [--check]")
    if sys.argv[1:] == ["--check"]:
        if not OUTPUT.exists() or OUTPUT.read_text() != render():
            sys.exit(f"{OUTPUT} is stale: run python3 {Path(__file__).name}")
    else:
        OUTPUT.write_text(render())
