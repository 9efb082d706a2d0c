#!/usr/bin/env python3
"""Writes a Llama-shaped model with random bf16 weights, in Hugging Face layout, for
benchmarking without downloading a checkpoint: the speed of a forward pass depends on
the shapes, not on the values.

    python3 benchmark/make_random_model.py /tmp/llama-8b-random [--preset llama-3.1-8b|tiny]

Output: config.json, generation_config.json, model-0000K-of-0000N.safetensors shards
(about 5 GB each) with model.safetensors.index.json, and the Llama 3 tokenizer.json and
tokenizer_config.json (chat template included) copied from --tokenizer-dir, which
benchmark/fetch_tokenizer.sh fills. The weights are drawn on the GPU when there is one
(16 GB for the 8B preset in well under a minute), else on the CPU.
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

PRESETS = {"llama-3.1-8b": LLAMA_3_1_8B, "tiny": TINY}
BYTES_PER_PARAM = 2  # bf16


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    # Norm weights start at one, as a freshly initialised model's do.
    ones: bool = False

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * BYTES_PER_PARAM


def tensor_specs(config: dict) -> list[TensorSpec]:
    """Every tensor of a Llama checkpoint, with the names transformers gives them."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (config["vocab_size"], hidden))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        specs += [
            TensorSpec(f"{p}.input_layernorm.weight", (hidden,), ones=True),
            TensorSpec(f"{p}.self_attn.q_proj.weight", (q_dim, hidden)),
            TensorSpec(f"{p}.self_attn.k_proj.weight", (kv_dim, hidden)),
            TensorSpec(f"{p}.self_attn.v_proj.weight", (kv_dim, hidden)),
            TensorSpec(f"{p}.self_attn.o_proj.weight", (hidden, q_dim)),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (hidden,), ones=True),
            TensorSpec(f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            TensorSpec(f"{p}.mlp.up_proj.weight", (inter, hidden)),
            TensorSpec(f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    specs.append(TensorSpec("model.norm.weight", (hidden,), ones=True))
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
            if spec.ones:
                tensor = torch.ones(spec.shape, dtype=torch.bfloat16, device=device)
            else:
                tensor = torch.randn(spec.shape, generator=generator, dtype=torch.bfloat16, device=device)
                tensor.mul_(std)
            tensors[spec.name] = tensor.cpu()
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        size_gb = sum(spec.nbytes for spec in shard) / 1e9
        print(f"{file}: {size_gb:.2f} GB in {time.perf_counter() - started:.1f}s", file=sys.stderr)


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not in {tokenizer_dir}: run benchmark/fetch_tokenizer.sh first"
        )
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out_dir / name)


def make_model(out_dir: Path, preset: str, tokenizer_dir: Path, std: float, seed: int, shard_gb: float, device: str):
    config = PRESETS[preset]
    out_dir.mkdir(parents=True, exist_ok=True)
    # The tokenizer first: a missing one fails before minutes of writing weights.
    copy_tokenizer(tokenizer_dir, out_dir)
    shards = plan_shards(tensor_specs(config), int(shard_gb * 1e9))
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
    args = parser.parse_args(argv)
    if args.shard_gb <= 0 or args.std <= 0:
        parser.error("--shard-gb and --std must be positive")
    started = time.perf_counter()
    try:
        make_model(args.out_dir, args.preset, args.tokenizer_dir, args.std, args.seed, args.shard_gb, args.device)
    except (FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.preset} model written to {args.out_dir} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
