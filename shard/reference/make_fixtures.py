"""Writes the model fixtures the shard's reference tests read (shard/tests/model_reference.rs).

    python shard/reference/make_fixtures.py OUTDIR [--gguf SMOLLM2_GGUF]

For each tiny random model (fixed seeds, so the output is reproducible) OUTDIR/NAME/ gets
an HF-layout model (config.json, model.safetensors or shards with their index,
tokenizer.json, tokenizer_config.json, generation_config.json) and expected.safetensors holding, for a few token sequences,
`input_ids.I` (int64 [len]) and `logits.I` (float32 [len, vocab]) from the numpy
reference (llama_ref.py). OUTDIR/llama3_gguf/ holds the Llama 3 one converted to GGUF
as llama.cpp does (f32 tensors, Q/K rows permuted, llama3 scaling as rope_freqs), with
its expected logits read back through the reference's GGUF loader. With --gguf, OUTDIR/smollm2/expected.safetensors holds the
reference logits of a short prompt on the GGUF's dequantized weights. The quantized
checkpoints of make_quantized.py (AWQ, GPTQ, FP8, and a bf16 one for --quantize at load)
go into OUTDIR too.

Then run: SHARD_FIXTURES=OUTDIR SHARD_GGUF=<gguf path> cargo test --release -p text-generation-shard --test model_reference

Needs: numpy, safetensors, gguf (pip install numpy safetensors gguf).
"""

import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref  # noqa: E402

VOCAB = 96
BASE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# name -> config overrides. Each exercises a part of the family.
MODELS = {
    # Multi-head attention, untied lm_head.
    "llama_mha": {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 4},
    # GQA, head_dim from config (!= hidden / heads), Llama 3.1 rope scaling with a short
    # original context so every scaling branch is hit, tied embeddings.
    "llama3_gqa_tied": {
        "model_type": "llama",
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        "tie_word_embeddings": True,
    },
    # Q/K/V biases, GQA, its unused sliding_window must stay off.
    "qwen2_bias": {
        "model_type": "qwen2",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "sliding_window": 3,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
    },
    # A sliding window shorter than the test sequences.
    "mistral_window": {
        "model_type": "mistral",
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "sliding_window": 4,
    },
    # Q/K head norms.
    "qwen3_qknorm": {
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "attention_bias": False,
        "tie_word_embeddings": True,
    },
}

# Written as sharded safetensors with an index.
SHARDED = {"mistral_window"}

SEQUENCE_LENGTHS = [11, 6, 1]

# "The capital of France is" in SmolLM2's tokenizer (model-store's GGUF tokenizer; the
# Rust test checks it still tokenizes to these ids).
SMOLLM2_PROMPT_IDS = [504, 3575, 282, 4649, 314]


def random_weights(cfg, rng):
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or hidden // heads

    def matrix(out_dim, in_dim):
        return rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)

    def norm(dim):
        return 1.0 + 0.1 * rng.standard_normal(dim)

    w = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, hidden)), "model.norm.weight": norm(hidden)}
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = matrix(VOCAB, hidden)
    bias = cfg.get("attention_bias", cfg["model_type"] == "qwen2")
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        for name, out_dim in (("q_proj", heads * d), ("k_proj", kv_heads * d), ("v_proj", kv_heads * d)):
            w[p + f"self_attn.{name}.weight"] = matrix(out_dim, hidden)
            if bias:
                w[p + f"self_attn.{name}.bias"] = 0.3 * rng.standard_normal(out_dim)
        w[p + "self_attn.o_proj.weight"] = matrix(hidden, heads * d)
        if cfg["model_type"] == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(d)
            w[p + "self_attn.k_norm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = matrix(inter, hidden)
        w[p + "mlp.up_proj.weight"] = matrix(inter, hidden)
        w[p + "mlp.down_proj.weight"] = matrix(hidden, inter)
    return {k: v.astype(np.float32) for k, v in w.items()}


def word_level_tokenizer():
    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    del vocab["t0"], vocab["t1"], vocab["t2"]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(["<unk>", "<s>", "</s>"])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def write_expected(path, sequences, logits):
    tensors = {}
    for i, (ids, out) in enumerate(zip(sequences, logits)):
        tensors[f"input_ids.{i}"] = np.asarray(ids, dtype=np.int64)
        tensors[f"logits.{i}"] = np.asarray(out, dtype=np.float32)
    save_file(tensors, path)


def write_tiny_model(out_dir, name, overrides, seed, sharded):
    rng = np.random.default_rng(seed)
    cfg = {**BASE, **overrides, "architectures": ["LlamaForCausalLM"]}
    model_dir = os.path.join(out_dir, name)
    os.makedirs(model_dir, exist_ok=True)
    weights = random_weights(cfg, rng)
    if sharded:
        # Two shards and an index, as large checkpoints come.
        names = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        weight_map = {}
        for file, shard_names in shards.items():
            save_file({n: weights[n] for n in shard_names}, os.path.join(model_dir, file))
            weight_map.update({n: file for n in shard_names})
        with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    else:
        save_file(weights, os.path.join(model_dir, "model.safetensors"))
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    with open(os.path.join(model_dir, "tokenizer.json"), "w") as f:
        json.dump(word_level_tokenizer(), f)
    ref_cfg, ref_weights = llama_ref.load_hf(model_dir)
    sequences = [rng.integers(3, VOCAB, size=n).tolist() for n in SEQUENCE_LENGTHS]
    logits = [llama_ref.forward(ref_cfg, ref_weights, ids) for ids in sequences]
    write_expected(os.path.join(model_dir, "expected.safetensors"), sequences, logits)


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (adjacent rotary pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(cfg):
    """convert_hf_to_gguf's rope_freqs for llama3 scaling: divisors of each frequency."""
    scaling = cfg["rope_scaling"]
    d = cfg["head_dim"]
    freqs = 1.0 / cfg["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_gguf_model(out_dir, hf_name, name):
    import gguf

    hf_dir = os.path.join(out_dir, hf_name)
    cfg, _ = llama_ref.load_hf(hf_dir)
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    model_dir = os.path.join(out_dir, name)
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "model.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    hf_to_gguf = {v: k for k, v in llama_ref._GGUF_LAYER_NAMES.items()}
    for hf, w in weights.items():
        if hf == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif hf == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif hf == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = hf.split(".", 3)
            module, param = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{hf_to_gguf[module]}.{param}"
            if module == "self_attn.q_proj":
                w = _permute(w, cfg["num_attention_heads"])
            elif module == "self_attn.k_proj":
                w = _permute(w, cfg["num_key_value_heads"])
        writer.add_tensor(gguf_name, np.ascontiguousarray(w, dtype=np.float32))
    if cfg.get("rope_scaling"):
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ref_cfg, ref_weights = llama_ref.load_gguf(path)
    hf_expected = load_file(os.path.join(hf_dir, "expected.safetensors"))
    sequences, logits = [], []
    for i in range(len(SEQUENCE_LENGTHS)):
        ids = hf_expected[f"input_ids.{i}"].tolist()
        out = llama_ref.forward(ref_cfg, ref_weights, ids)
        # The conversion round trip is exact up to float rounding.
        assert np.allclose(out, hf_expected[f"logits.{i}"], atol=1e-4), "GGUF conversion changed the model"
        sequences.append(ids)
        logits.append(out)
    write_expected(os.path.join(model_dir, "expected.safetensors"), sequences, logits)


def write_gguf_reference(out_dir, gguf_path):
    cfg, weights = llama_ref.load_gguf(gguf_path)
    logits = llama_ref.forward(cfg, weights, SMOLLM2_PROMPT_IDS)
    model_dir = os.path.join(out_dir, "smollm2")
    os.makedirs(model_dir, exist_ok=True)
    write_expected(os.path.join(model_dir, "expected.safetensors"), [SMOLLM2_PROMPT_IDS], [logits])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    default_gguf = os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "../../models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    parser.add_argument("--gguf", help="SmolLM2 GGUF file to compute reference logits for")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for seed, (name, overrides) in enumerate(MODELS.items()):
        write_tiny_model(args.out_dir, name, overrides, seed, sharded=name in SHARDED)
        print(f"wrote {os.path.join(args.out_dir, name)}")
    import make_quantized  # here: it imports this module's helpers

    make_quantized.write_all(args.out_dir)
    write_gguf_model(args.out_dir, "llama3_gqa_tied", "llama3_gguf")
    print(f"wrote {os.path.join(args.out_dir, 'llama3_gguf')}")
    gguf_path = args.gguf or os.path.normpath(default_gguf)
    if args.gguf or os.path.exists(gguf_path):
        write_gguf_reference(args.out_dir, gguf_path)
        print(f"wrote {os.path.join(args.out_dir, 'smollm2')}")
    else:
        print(f"warning: {gguf_path} missing (scripts/fetch-default-model.sh): no SmolLM2 reference", file=sys.stderr)


if __name__ == "__main__":
    main()
