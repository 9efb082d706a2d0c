#!/usr/bin/env python3
"""Writes a Llama-shaped model with random bf16 weights, in Hugging Face layout, for
benchmarking without downloading a checkpoint: the speed of a forward pass depends on
the shapes, not on the values.

    python3 benchmark/make_random_model.py /tmp/llama-8b-random [--preset llama-3.1-8b|llama-3.1-70b|tiny]
        [--quantize awq|gptq|fp8]

Output: config.json, generation_config.json, model-0000K-of-0000N.safetensors shards
(about 5 GB each) with model.safetensors.index.json, and the Llama 3 tokenizer.json and
tokenizer_config.json (chat template included) copied from --tokenizer-dir, which
benchmark/fetch_tokenizer.sh fills. The weights are drawn on the GPU when there is one
(16 GB for the 8B preset in well under a minute), else on the CPU.

--quantize writes the linear layers packed instead, with the config.json
`quantization_config` of the format: AWQ (AutoAWQ gemm: qweight, qzeros, f16 scales,
group 128), GPTQ (4 bits, group 128, v1 zeros, g_idx) or FP8 (compressed-tensors, E4M3
with per-channel scales). Codes are uniformly random and scales chosen so that the
weights keep about --std; embeddings, norms and lm_head stay bf16.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER_DIR = REPO_ROOT / ".bench-assets" / "llama3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Llama 3.1's special token ids; end of generation as in Llama-3.1-8B-Instruct.
BOS_TOKEN_ID = 128000
EOS_TOKEN_IDS = [128001, 128008, 128009]

LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_IDS,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
}

# The same architecture at toy size (vocabulary kept: it must match the tokenizer), for
# trying the whole pipeline in seconds.
TINY = {
    **LLAMA_3_1_8B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 8192,
}

LLAMA_3_1_70B = {
    **LLAMA_3_1_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}

PRESETS = {"llama-3.1-8b": LLAMA_3_1_8B, "llama-3.1-70b": LLAMA_3_1_70B, "tiny": TINY}
GROUP_SIZE = 128  # AWQ's and GPTQ's usual group

QUANTIZATION_CONFIGS = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP_SIZE, "desc_act": False, "sym": True,
             "checkpoint_format": "gptq"},
    "fp8": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}},
}

# Bytes per element of each kind of tensor.
ITEM_SIZES = {"normal": 2, "ones": 2, "codes": 4, "zeros": 4, "zeros_less_one": 4, "scales": 2, "g_idx": 4, "fp8": 1, "fp8_scales": 4}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    # normal: random bf16; ones: norm weights, at one as a freshly initialised model's;
    # codes: random int32 words; zeros: int32 words of zero points 8 (4 bits), or
    # zeros_less_one as GPTQ v1 stores them; scales:
    # f16 group scales; g_idx: int32 group of each input; fp8: E4M3 weights; fp8_scales:
    # f32 per-channel scales.
    kind: str = "normal"

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * ITEM_SIZES[self.kind]


def linear_specs(prefix: str, out_dim: int, in_dim: int, quantize: str | None) -> list[TensorSpec]:
    """The tensors of one `[out, in]` linear layer in `quantize`'s layout."""
    groups = in_dim // GROUP_SIZE
    if quantize == "awq":
        return [TensorSpec(f"{prefix}.qweight", (in_dim, out_dim // 8), "codes"),
                TensorSpec(f"{prefix}.qzeros", (groups, out_dim // 8), "zeros"),
                TensorSpec(f"{prefix}.scales", (groups, out_dim), "scales")]
    if quantize == "gptq":
        return [TensorSpec(f"{prefix}.qweight", (in_dim // 8, out_dim), "codes"),
                TensorSpec(f"{prefix}.qzeros", (groups, out_dim // 8), "zeros_less_one"),
                TensorSpec(f"{prefix}.scales", (groups, out_dim), "scales"),
                TensorSpec(f"{prefix}.g_idx", (in_dim,), "g_idx")]
    if quantize == "fp8":
        return [TensorSpec(f"{prefix}.weight", (out_dim, in_dim), "fp8"),
                TensorSpec(f"{prefix}.weight_scale", (out_dim, 1), "fp8_scales")]
    return [TensorSpec(f"{prefix}.weight", (out_dim, in_dim))]


def tensor_specs(config: dict, quantize: str | None = None) -> list[TensorSpec]:
    """Every tensor of a Llama checkpoint, with the names transformers gives them."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (config["vocab_size"], hidden))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        specs.append(TensorSpec(f"{p}.input_layernorm.weight", (hidden,), "ones"))
        for name, out_dim, in_dim in [("self_attn.q_proj", q_dim, hidden), ("self_attn.k_proj", kv_dim, hidden),
                                      ("self_attn.v_proj", kv_dim, hidden), ("self_attn.o_proj", hidden, q_dim)]:
            specs += linear_specs(f"{p}.{name}", out_dim, in_dim, quantize)
        specs.append(TensorSpec(f"{p}.post_attention_layernorm.weight", (hidden,), "ones"))
        for name, out_dim, in_dim in [("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden),
                                      ("mlp.down_proj", hidden, inter)]:
            specs += linear_specs(f"{p}.{name}", out_dim, in_dim, quantize)
    specs.append(TensorSpec("model.norm.weight", (hidden,), "ones"))
    if not config["tie_word_embeddings"]:
        specs.append(TensorSpec("lm_head.weight", (config["vocab_size"], hidden)))
    return specs


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if shards and size + spec.nbytes <= max_shard_bytes:
            shards[-1].append(spec)
            size += spec.nbytes
        else:
            shards.append([spec])
            size = spec.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def weight_index(shards: list[list[TensorSpec]]) -> dict:
    names = shard_file_names(len(shards))
    return {
        "metadata": {"total_size": sum(spec.nbytes for shard in shards for spec in shard)},
        "weight_map": {spec.name: file for shard, file in zip(shards, names) for spec in shard},
    }


def generation_config() -> dict:
    return {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_IDS, "do_sample": False}


def write_weights(out_dir: Path, shards: list[list[TensorSpec]], std: float, seed: int, device: str) -> None:
    # Imported here so the planning above needs no torch.
    import torch
    from safetensors.torch import save_file

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(seed)
    for shard, file in zip(shards, shard_file_names(len(shards))):
        started = time.perf_counter()
        tensors = {}
        for spec in shard:
            tensors[spec.name] = random_tensor(torch, spec, std, generator, device).cpu()
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        size_gb = sum(spec.nbytes for spec in shard) / 1e9
        print(f"{file}: {size_gb:.2f} GB in {time.perf_counter() - started:.1f}s", file=sys.stderr)


def random_tensor(torch, spec: TensorSpec, std: float, generator, device: str):
    if spec.kind == "ones":
        return torch.ones(spec.shape, dtype=torch.bfloat16, device=device)
    if spec.kind == "codes":
        return torch.randint(-(2**31), 2**31 - 1, spec.shape, generator=generator, dtype=torch.int32, device=device)
    if spec.kind == "zeros":
        # Zero points of 8 in every nibble, as AWQ stores them.
        return torch.full(spec.shape, 0x88888888 - 2**32, dtype=torch.int32, device=device)
    if spec.kind == "zeros_less_one":
        # GPTQ v1 stores every zero point less one: 7 for 8.
        return torch.full(spec.shape, 0x77777777, dtype=torch.int32, device=device)
    if spec.kind == "scales":
        # Uniform codes 0..15 about their zero point spread with a deviation of ~4.6.
        return torch.full(spec.shape, std / 4.6, dtype=torch.float16, device=device)
    if spec.kind == "g_idx":
        return torch.arange(spec.shape[0], dtype=torch.int32, device=device) // GROUP_SIZE
    normal = torch.randn(spec.shape, generator=generator, dtype=torch.float32, device=device) * std
    if spec.kind == "fp8":
        scale = normal.abs().amax(dim=1, keepdim=True) / 448.0
        return (normal / scale).to(torch.float8_e4m3fn)
    if spec.kind == "fp8_scales":
        # The largest of a row of ~N(0, std) weights is near 5 std at these widths.
        return torch.full(spec.shape, 5 * std / 448.0, dtype=torch.float32, device=device)
    return normal.to(torch.bfloat16)


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not in {tokenizer_dir}: run benchmark/fetch_tokenizer.sh first"
        )
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out_dir / name)


def make_model(out_dir: Path, preset: str, tokenizer_dir: Path, std: float, seed: int, shard_gb: float, device: str,
               quantize: str | None = None):
    config = PRESETS[preset]
    if quantize:
        config = {**config, "quantization_config": QUANTIZATION_CONFIGS[quantize]}
    out_dir.mkdir(parents=True, exist_ok=True)
    # The tokenizer first: a missing one fails before minutes of writing weights.
    copy_tokenizer(tokenizer_dir, out_dir)
    shards = plan_shards(tensor_specs(config, quantize), int(shard_gb * 1e9))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(), indent=2))
    write_weights(out_dir, shards, std, seed, device)
    # Last: its presence tells benchmark/run_gpu.sh that the model is complete.
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(weight_index(shards), indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.1-8b")
    parser.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER_DIR)
    parser.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest safetensors file, in GB")
    parser.add_argument("--device", default="auto", help="torch device to draw the weights on")
    parser.add_argument("--quantize", choices=sorted(QUANTIZATION_CONFIGS), help="write the linear layers packed")
    args = parser.parse_args(argv)
    if args.shard_gb <= 0 or args.std <= 0:
        parser.error("--shard-gb and --std must be positive")
    started = time.perf_counter()
    try:
        make_model(args.out_dir, args.preset, args.tokenizer_dir, args.std, args.seed, args.shard_gb, args.device,
                   args.quantize)
    except (FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.preset} model written to {args.out_dir} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
