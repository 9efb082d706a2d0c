"""Per-request measurements of the load generator and their summaries (pure Python, no I/O)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    """One streamed completion, times in seconds from the request's start."""

    error: str | None = None
    # Time to the first streamed token.
    ttft: float | None = None
    # Gaps between consecutive streamed tokens.
    itls: list[float] = field(default_factory=list)
    latency: float | None = None
    output_tokens: int = 0
    # As the server counted them (`usage.prompt_tokens`), when it reports them.
    prompt_tokens: int | None = None
    # The streamed completion (a chat turn appends it to the conversation).
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first over the time after the first: the stream's decode rate."""
        if not self.ok or self.output_tokens < 2 or self.latency is None or self.ttft is None:
            return None
        decode_time = self.latency - self.ttft
        return (self.output_tokens - 1) / decode_time if decode_time > 0 else None


def percentile(values: list[float], q: float) -> float | None:
    """Percentile `q` (0..100) interpolating linearly between closest ranks, as numpy does;
    None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1e3


def summarize(
    name: str,
    concurrency: int,
    prompt_tokens: int,
    max_tokens: int,
    results: list[RequestResult],
    wall_s: float,
) -> dict:
    """The figures of one load level: `results` ran `concurrency` at a time in `wall_s` seconds."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itls]
    latencies = [r.latency for r in ok if r.latency is not None]
    decode_rates = [rate for r in ok if (rate := r.decode_tokens_per_s()) is not None]
    output_tokens = sum(r.output_tokens for r in ok)
    reported = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    errors = [r.error for r in results if not r.ok]
    ttft_p50 = percentile(ttfts, 50)
    return {
        "name": name,
        "concurrency": concurrency,
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "requests": len(results),
        "errors": len(errors),
        # A few distinct messages are enough to diagnose; thousands of copies are not.
        "error_samples": sorted(set(errors))[:5],
        # Requests whose prompt the server counted differently from the tokenizer here.
        "prompt_token_mismatches": sum(1 for n in reported if n != prompt_tokens),
        # Requests that stopped before max_tokens (EOS when the server ignores `ignore_eos`).
        "short_outputs": sum(1 for r in ok if r.output_tokens < max_tokens),
        "wall_s": wall_s,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "decode_tokens_per_s_per_request_p50": percentile(decode_rates, 50),
        # Prompt tokens over the median TTFT: the prefill rate when requests run alone.
        "prefill_tokens_per_s": prompt_tokens / ttft_p50 if ttft_p50 else None,
        "ttft_ms_p50": _ms(ttft_p50),
        "ttft_ms_p99": _ms(percentile(ttfts, 99)),
        "itl_ms_p50": _ms(percentile(itls, 50)),
        "itl_ms_p99": _ms(percentile(itls, 99)),
        "e2e_ms_p50": _ms(percentile(latencies, 50)),
        "e2e_ms_p99": _ms(percentile(latencies, 99)),
    }


COLUMNS = [
    ("name", "level"),
    ("concurrency", "conc."),
    ("prompt_tokens", "prompt"),
    ("max_tokens", "new"),
    ("requests", "reqs"),
    ("errors", "errors"),
    ("output_tokens_per_s", "out tok/s"),
    ("decode_tokens_per_s_per_request_p50", "tok/s/stream p50"),
    ("prefill_tokens_per_s", "prefill tok/s"),
    ("ttft_ms_p50", "TTFT p50 ms"),
    ("ttft_ms_p99", "TTFT p99 ms"),
    ("itl_ms_p50", "ITL p50 ms"),
    ("itl_ms_p99", "ITL p99 ms"),
    ("e2e_ms_p50", "E2E p50 ms"),
    ("e2e_ms_p99", "E2E p99 ms"),
]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        # Three significant figures are plenty for timings that vary by a few percent.
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def markdown_table(levels: list[dict]) -> str:
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" if key == "name" else "---:" for key, _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cell(level.get(key)) for key, _ in COLUMNS) + " |" for level in levels]
    return "\n".join(lines)


SAMPLING_COLUMNS = ["preset", "conc.", "errors", "out tok/s", "vs greedy", "ITL p50 ms", "TTFT p50 ms"]


def sampling_table(levels: list[dict]) -> str:
    """One row per level of a sampling sweep (levels carry their preset in `sampling`), with
    its output tokens/s over greedy's at the same concurrency ("-" without a greedy level)."""
    greedy = {level["concurrency"]: level["output_tokens_per_s"] for level in levels if level["sampling"] == "greedy"}
    lines = [
        "| " + " | ".join(SAMPLING_COLUMNS) + " |",
        "|---|" + "---:|" * (len(SAMPLING_COLUMNS) - 1),
    ]
    for level in levels:
        rate, baseline = level["output_tokens_per_s"], greedy.get(level["concurrency"])
        ratio = f"{rate / baseline:.0%}" if rate is not None and baseline else None
        cells = [level["sampling"], level["concurrency"], level["errors"], rate, ratio, level["itl_ms_p50"], level["ttft_ms_p50"]]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)
