"""Tensor parallelism end to end on CPU: the launcher started with `--num-shard 2` on a
tiny HF model (shard fixtures from shard/reference/make_fixtures.py, found through
SHARD_FIXTURES) answers greedy /generate requests exactly as `--num-shard 1` does, and a
shard dying takes the whole group down."""

import json
import os
import signal
from pathlib import Path

import pytest
import requests

from launcher_harness import Launcher, assert_all_gone, descendants, free_port

FIXTURES = os.environ.get("SHARD_FIXTURES")
PROMPTS = ["t17 t42 t5", "t88 t23 t61 t7 t9"]


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    assert FIXTURES, "SHARD_FIXTURES is not set: run shard/reference/make_fixtures.py (scripts/test.sh does)"
    model = Path(FIXTURES) / "llama3_gqa_tied"
    assert model.is_dir(), f"{model} missing: regenerate the shard fixtures"
    return model


def start(model: Path, num_shard: int) -> Launcher:
    launcher = Launcher("--num-shard", str(num_shard), "--master-port", str(free_port()), model=model)
    launcher.wait_healthy()
    return launcher


def greedy(launcher: Launcher, prompt: str) -> str:
    response = requests.post(
        f"{launcher.url}/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": 8, "do_sample": False}},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


def test_two_shards_generate_what_one_shard_does(tiny_model):
    expected = {}
    single = start(tiny_model, 1)
    try:
        for prompt in PROMPTS:
            expected[prompt] = greedy(single, prompt)
    finally:
        single.stop()
    sharded = start(tiny_model, 2)
    try:
        assert len(sharded.shard_sockets()) == 2
        for prompt in PROMPTS:
            assert greedy(sharded, prompt) == expected[prompt], prompt
    finally:
        sharded.stop()


def test_a_dead_shard_takes_the_group_down(tiny_model):
    launcher = start(tiny_model, 2)
    processes = descendants(launcher.process.pid)
    shard_1 = [pid for pid in processes if "text-generation-shard" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
    assert shard_1, launcher.tail()
    # Any shard of the group will do: the launcher must stop every process.
    os.kill(shard_1[-1], signal.SIGKILL)
    assert launcher.wait_exit() != 0
    assert_all_gone(processes, launcher)
