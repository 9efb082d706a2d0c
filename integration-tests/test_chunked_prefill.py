"""Chunked prefill against the real launcher: with a prefill budget smaller than the
prompt, the prompt is prefilled over several steps (beside a running stream's decode
steps) and gives the greedy tokens of one unchunked prefill."""

from concurrent.futures import ThreadPoolExecutor

from launcher_harness import Launcher
from prefix_helpers import LONG_PROMPT, counter, greedy_tokens

LIMITS = ("--max-total-tokens", "512", "--max-input-tokens", "400", "--prefix-caching", "false")


def served(*extra_args: str, work):
    launcher = Launcher(*LIMITS, *extra_args)
    try:
        launcher.wait_healthy()
        return work(launcher.url)
    finally:
        assert launcher.stop() == 0, launcher.tail()


def test_a_long_prompt_is_chunked_and_gives_the_tokens_of_one_prefill():
    unchunked = served(work=lambda url: greedy_tokens(url, LONG_PROMPT))

    def chunked(url):
        with ThreadPoolExecutor(2) as pool:
            # A stream decoding while the long prompt is prefilled in chunks beside it.
            running = pool.submit(greedy_tokens, url, "Once upon a time", 48)
            tokens = greedy_tokens(url, LONG_PROMPT)
            assert len(running.result()) > 0
        return tokens, counter(url, "tgi_prefill_chunked_total")

    tokens, chunked_prompts = served("--max-batch-prefill-tokens", "64", work=chunked)
    assert chunked_prompts >= 1
    assert tokens == unchunked
