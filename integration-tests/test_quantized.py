"""Quantized checkpoints end to end on CPU: the launcher serves tiny random AWQ and GPTQ
checkpoints (written by shard/reference/make_quantized.py, packed as AutoAWQ and
AutoGPTQ pack them), on one shard and on two, and a bf16 one with `--quantize
bitsandbytes-nf4`, and their greedy token is the numpy reference's; `--quantize` values
the checkpoint cannot take fail before serving, naming the flag."""

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from safetensors.numpy import load_file

from launcher_harness import ROOT, Launcher, free_port

MODELS = ["awq_g64", "gptq_4bit_g32_act_order_asym", "dense_bf16"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized")
    subprocess.run(
        [sys.executable, str(ROOT / "shard" / "reference" / "make_quantized.py"), str(out), *MODELS],
        check=True,
        capture_output=True,
    )
    return out


@pytest.mark.parametrize(
    "name, flags, reference, quantization",
    [
        ("awq_g64", [], "expected.safetensors", "awq:4bit-g64"),
        ("gptq_4bit_g32_act_order_asym", [], "expected.safetensors", "gptq:4bit-g32-act-order-asym"),
        ("gptq_4bit_g32_act_order_asym", ["--num-shard", "2"], "expected.safetensors", "gptq:4bit-g32-act-order-asym"),
        ("dense_bf16", ["--quantize", "bitsandbytes-nf4"], "expected.bitsandbytes-nf4.safetensors", "bitsandbytes-nf4"),
    ],
)
def test_a_quantized_checkpoint_answers_with_the_reference_token(checkpoints, name, flags, reference, quantization):
    model = checkpoints / name
    expected = load_file(str(model / reference))
    ids, logits = expected["input_ids.0"], expected["logits.0"]
    launcher = Launcher(*flags, "--master-port", str(free_port()), model=model)
    try:
        launcher.wait_healthy()
        response = requests.post(
            f"{launcher.url}/generate",
            json={
                "inputs": " ".join(f"t{i}" for i in ids),
                "parameters": {"max_new_tokens": 4, "do_sample": False, "details": True},
            },
            timeout=120,
        )
        assert response.status_code == 200, response.text
        details = response.json()["details"]
        assert details["tokens"][0]["id"] == int(logits[-1].argmax()), launcher.tail()
        info = requests.get(f"{launcher.url}/info", timeout=10).json()
        assert info["quantization"] == quantization, info
    finally:
        launcher.stop()


@pytest.mark.parametrize(
    "flags, model, message",
    [
        (["--quantize", "gptq"], "awq_g64", "`--quantize gptq` contradicts the checkpoint"),
        (["--quantize", "awq"], None, "`--quantize awq` applies to safetensors checkpoints"),
        (["--quantize", "eetq"], "awq_g64", "--quantize"),
    ],
)
def test_quantize_values_the_checkpoint_cannot_take_are_refused(checkpoints, flags, model, message):
    launcher = Launcher(*flags, **({"model": checkpoints / model} if model else {}))
    assert launcher.wait_exit(timeout=60) != 0
    assert message in launcher.output(), launcher.tail()
