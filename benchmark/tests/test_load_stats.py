import pytest

from load_stats import RequestResult, markdown_table, percentile, sampling_table, summarize


def test_percentile_interpolates_like_numpy():
    values = list(range(100, 0, -1))
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0


def test_percentile_of_nothing_is_none_and_bad_q_is_an_error():
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_decode_rate_excludes_the_first_token():
    result = RequestResult(ttft=0.5, latency=1.5, output_tokens=11)
    assert result.decode_tokens_per_s() == pytest.approx(10.0)
    assert RequestResult(ttft=0.5, latency=0.5, output_tokens=1).decode_tokens_per_s() is None
    assert RequestResult(error="boom").decode_tokens_per_s() is None


def test_summary_of_a_level():
    results = [
        RequestResult(ttft=0.1, itls=[0.01, 0.03], latency=0.2, output_tokens=3, prompt_tokens=16),
        RequestResult(ttft=0.3, itls=[0.02, 0.02], latency=0.4, output_tokens=3, prompt_tokens=17),
        RequestResult(error="HTTP 429: busy"),
        RequestResult(error="HTTP 429: busy"),
    ]
    s = summarize("c=2", 2, 16, 3, results, wall_s=0.5)
    assert s["requests"] == 4
    assert s["errors"] == 2
    assert s["error_samples"] == ["HTTP 429: busy"]
    assert s["prompt_token_mismatches"] == 1
    assert s["short_outputs"] == 0
    assert s["output_tokens"] == 6
    assert s["output_tokens_per_s"] == pytest.approx(12.0)
    assert s["requests_per_s"] == pytest.approx(4.0)
    assert s["ttft_ms_p50"] == pytest.approx(200.0)
    assert s["ttft_ms_p99"] == pytest.approx(298.0)
    assert s["itl_ms_p50"] == pytest.approx(20.0)
    assert s["e2e_ms_p50"] == pytest.approx(300.0)
    assert s["prefill_tokens_per_s"] == pytest.approx(16 / 0.2)
    assert s["decode_tokens_per_s_per_request_p50"] == pytest.approx(20.0)


def test_summary_with_only_errors_has_no_latencies():
    s = summarize("c=1", 1, 8, 4, [RequestResult(error="x")], wall_s=1.0)
    assert s["errors"] == 1
    assert s["ttft_ms_p50"] is None and s["e2e_ms_p99"] is None and s["prefill_tokens_per_s"] is None
    assert s["output_tokens_per_s"] == 0


def test_markdown_table():
    results = [RequestResult(ttft=0.012, itls=[0.005], latency=0.017, output_tokens=2)]
    table = markdown_table([summarize("sweep c=1", 1, 512, 2, results, wall_s=0.02)])
    header, rule, row = table.splitlines()
    assert header.startswith("| level | conc. | prompt | new |")
    assert rule.count("|") == header.count("|")
    assert row.startswith("| sweep c=1 | 1 | 512 | 2 | 1 | 0 | 100 |")
    assert "| 12.0 |" in row  # TTFT p50 in ms
    assert row.count("|") == header.count("|")


def test_sampling_table_compares_each_preset_with_greedy_at_its_concurrency():
    def level(sampling, concurrency, wall_s):
        results = [RequestResult(ttft=0.01, itls=[0.004], latency=0.02, output_tokens=100)]
        return {**summarize(f"{sampling} c={concurrency}", concurrency, 512, 100, results, wall_s), "sampling": sampling}

    levels = [level("greedy", 1, 1.0), level("greedy", 64, 0.5), level("t0.7-p0.9", 1, 2.0), level("t0.7-p0.9", 64, 0.5)]
    header, rule, *rows = sampling_table(levels).splitlines()
    assert header == "| preset | conc. | errors | out tok/s | vs greedy | ITL p50 ms | TTFT p50 ms |"
    assert rule.count("|") == header.count("|")
    assert rows[0] == "| greedy | 1 | 0 | 100 | 100% | 4.00 | 10.0 |"
    assert rows[2].startswith("| t0.7-p0.9 | 1 | 0 | 50.0 | 50% |")
    assert rows[3].startswith("| t0.7-p0.9 | 64 | 0 | 200 | 100% |")
    # Without greedy levels there is nothing to compare with.
    assert "| - |" in sampling_table(levels[2:3])
