"""Prefix caching against the real launcher: a prompt sent again is prefilled from its
cached KV blocks and gives the same greedy tokens; prompt logprobs still cover the whole
prompt; `PREFIX_CACHING=0` turns it off."""

import math

import pytest
import requests

from launcher_harness import Launcher
from prefix_helpers import LONG_PROMPT, counter, greedy_tokens, prompt_length

SMALL = ("--max-total-tokens", "512", "--max-input-tokens", "400")


@pytest.fixture(scope="module")
def cached_url():
    launcher = Launcher(*SMALL)
    try:
        launcher.wait_healthy()
        yield launcher.url
    finally:
        assert launcher.stop() == 0, launcher.tail()


def test_a_repeated_prompt_hits_the_cache_and_gives_the_same_tokens(cached_url):
    info = requests.get(f"{cached_url}/info", timeout=10).json()
    assert info["prefix_caching"] is True
    block_size = info["block_size"]
    length = prompt_length(cached_url, LONG_PROMPT)
    assert length > 4 * block_size
    hits_before = counter(cached_url, "tgi_prefix_cache_hit_tokens_total")
    cold = greedy_tokens(cached_url, LONG_PROMPT)
    assert counter(cached_url, "tgi_prefix_cache_hit_tokens_total") == hits_before
    warm = greedy_tokens(cached_url, LONG_PROMPT)
    assert warm == cold
    # Every whole block but the one of the last prompt token.
    assert counter(cached_url, "tgi_prefix_cache_hit_tokens_total") - hits_before == (length - 1) // block_size * block_size
    assert counter(cached_url, "tgi_prefix_cache_blocks") > 0
    # A longer prompt starting the same way reuses the blocks too.
    hits = counter(cached_url, "tgi_prefix_cache_hit_tokens_total")
    greedy_tokens(cached_url, LONG_PROMPT + " walked home")
    assert counter(cached_url, "tgi_prefix_cache_hit_tokens_total") > hits


def test_prompt_logprobs_are_computed_for_the_whole_cached_prompt(cached_url):
    greedy_tokens(cached_url, LONG_PROMPT)
    body = {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 2, "details": True, "decoder_input_details": True}}
    response = requests.post(f"{cached_url}/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    prefill = response.json()["details"]["prefill"]
    assert len(prefill) == prompt_length(cached_url, LONG_PROMPT)
    logprobs = [token["logprob"] for token in prefill[1:]]
    assert all(isinstance(lp, float) and math.isfinite(lp) for lp in logprobs), logprobs[:8]


def test_prefix_caching_0_turns_it_off():
    launcher = Launcher(*SMALL, env={"PREFIX_CACHING": "0"})
    try:
        launcher.wait_healthy()
        assert requests.get(f"{launcher.url}/info", timeout=10).json()["prefix_caching"] is False
        greedy_tokens(launcher.url, LONG_PROMPT, max_new_tokens=2)
        greedy_tokens(launcher.url, LONG_PROMPT, max_new_tokens=2)
        assert counter(launcher.url, "tgi_prefix_cache_hit_tokens_total") == 0
    finally:
        assert launcher.stop() == 0, launcher.tail()
