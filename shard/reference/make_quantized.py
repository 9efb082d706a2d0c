"""Writes tiny random quantized checkpoints, packed as the quantization tools pack them,
and their reference logits (shard/tests/model_reference.rs and tensor_parallel.rs,
integration-tests/test_quantized.py). make_fixtures.py writes them all with its fixtures.

    python shard/reference/make_quantized.py OUTDIR [NAME ...]

For each model OUTDIR/NAME/ gets an HF-layout checkpoint (config.json with its
quantization_config, model.safetensors, the word-level tokenizer of make_fixtures.py)
and expected.safetensors (`input_ids.I`, `logits.I`): llama_ref.py's forward pass over
the weights that the packed tensors stand for, unpacked here independently of the
packing (the way TGI's and vLLM's reference code reads them).

- AWQ (AutoAWQ `WQLinear_GEMM.from_linear`): qweight [in, out/8] int32 with the
  columns of each word in order [0, 2, 4, 6, 1, 3, 5, 7], qzeros [in/g, out/8], scales
  f16 [in/g, out]; zero-point round-to-nearest quantization (`pseudo_quantize_tensor`).
- GPTQ (AutoGPTQ `QuantLinear.pack`): qweight [in*bits/32, out] packed along the inputs,
  qzeros [groups, out*bits/32] (v1 stores zero - 1; `checkpoint_format: gptq_v2` does
  not), scales f16, g_idx; act-order (desc_act) assigns groups in a random activation
  order; the quantizer's grid (sym/asym) is AutoGPTQ's `Quantizer.find_params`.
- FP8 (llm-compressor compressed-tensors, FBGEMM): F8_E4M3 weights (round to nearest
  even) with per-channel or per-tensor weight_scale.
- `dense_bf16`: a bf16 checkpoint for `--quantize` at load; expected.QUANTIZE.safetensors
  holds the logits of its weights quantized as the shard does at load (FP8 per channel,
  bitsandbytes NF4/FP4 in blocks of 64, LLM.int8 rows).

numpy only (no torch); the safetensors files are written here (numpy has no bf16/fp8).
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref  # noqa: E402
from make_fixtures import SEQUENCE_LENGTHS, VOCAB, word_level_tokenizer, write_expected  # noqa: E402

BASE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

# --quantize values applied at load to `dense_bf16`.
AT_LOAD = ["fp8", "bitsandbytes-nf4", "bitsandbytes-fp4", "bitsandbytes"]


# ---------------------------------------------------------------- safetensors writer

def save_safetensors(tensors, path):
    """tensors: name -> (safetensors dtype string, numpy array holding those bytes)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        dtype, array = tensors[name]
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def f16(a):
    return ("F16", np.asarray(a, dtype=np.float16))


def f32(a):
    return ("F32", np.asarray(a, dtype=np.float32))


def i32(a):
    return ("I32", np.asarray(a).astype(np.uint32).view(np.int32))


def bf16_round(a):
    """float32 values rounded to bf16 (nearest even) and the bf16 bits."""
    bits = np.asarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return (rounded.astype(np.uint32) << 16).view(np.float32), rounded


# ---------------------------------------------------------------- FP8 E4M3

def e4m3_values():
    """The values of codes 0..126 (the non-negative finite ones), increasing."""
    codes = np.arange(127)
    exp, mantissa = codes >> 3, codes & 7
    return np.where(exp == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exp - 7.0))


def e4m3_encode(x):
    """float32 -> E4M3 codes (uint8), round to nearest even, saturating at 448."""
    values = e4m3_values()
    a = np.minimum(np.abs(x).astype(np.float64), 448.0)
    hi = np.clip(np.searchsorted(values, a), 1, 126)
    lo = hi - 1
    d_lo, d_hi = a - values[lo], values[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def e4m3_decode(codes):
    values = e4m3_values()
    magnitude = values[codes & 0x7F]
    return np.where(codes & 0x80, -magnitude, magnitude)


# ---------------------------------------------------------------- AWQ

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def awq_quantize(w, group_size):
    """AutoAWQ's pseudo_quantize_tensor (zero point, 4 bits) and WQLinear_GEMM packing."""
    out_dim, in_dim = w.shape
    groups = w.reshape(out_dim, in_dim // group_size, group_size)
    max_val, min_val = groups.max(axis=2), groups.min(axis=2)
    scales = (np.maximum(max_val - min_val, 1e-5) / 15).astype(np.float16)
    zeros = np.clip(np.round(-min_val / scales), 0, 15)
    q = np.clip(np.round(groups / scales[..., None]) + zeros[..., None], 0, 15).reshape(out_dim, in_dim)
    intweight = q.T.astype(np.uint32)  # [in, out]
    qweight = np.zeros((in_dim, out_dim // 8), dtype=np.uint32)
    for col in range(out_dim // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_PACK_ORDER[i]] << (i * 4)
    int_zeros = zeros.T.astype(np.uint32)  # [in/g, out]
    qzeros = np.zeros((in_dim // group_size, out_dim // 8), dtype=np.uint32)
    for col in range(out_dim // 8):
        for i in range(8):
            qzeros[:, col] |= int_zeros[:, col * 8 + AWQ_PACK_ORDER[i]] << (i * 4)
    return {"qweight": i32(qweight), "qzeros": i32(qzeros), "scales": f16(scales.T)}


def awq_dequantize(t, group_size):
    """As TGI/vLLM's awq reference unpacks: nibbles in order, then AWQ_REVERSE_ORDER."""
    shifts = np.arange(0, 32, 4, dtype=np.uint32)

    def unpack(words):
        nibbles = (words.view(np.uint32)[:, :, None] >> shifts) & 0xF
        nibbles = nibbles.reshape(words.shape[0], -1, 8)[:, :, AWQ_REVERSE_ORDER]
        return nibbles.reshape(words.shape[0], -1).astype(np.int64)

    q, z = unpack(t["qweight"][1]), unpack(t["qzeros"][1])
    scales = t["scales"][1].astype(np.float64)
    rows = np.arange(q.shape[0]) // group_size
    return ((q - z[rows]) * scales[rows]).T


# ---------------------------------------------------------------- GPTQ

def gptq_quantize(w, bits, group_size, desc_act, sym, v2, rng):
    """AutoGPTQ's Quantizer grid (round to nearest) and QuantLinear.pack."""
    out_dim, in_dim = w.shape
    maxq = 2**bits - 1
    size = in_dim if group_size == -1 else group_size
    order = rng.permutation(in_dim) if desc_act else np.arange(in_dim)
    g_idx = np.empty(in_dim, dtype=np.int64)
    g_idx[order] = np.arange(in_dim) // size
    num_groups = in_dim // size
    scales = np.zeros((num_groups, out_dim))
    zeros = np.zeros((num_groups, out_dim))
    for g in range(num_groups):
        x = w[:, g_idx == g]
        xmin, xmax = np.minimum(x.min(axis=1), 0), np.maximum(x.max(axis=1), 0)
        if sym:
            xmax = np.maximum(np.abs(xmin), xmax)
            xmin = np.where(xmin < 0, -xmax, xmin)
        scale = (xmax - xmin) / maxq
        scales[g] = scale
        zeros[g] = np.full(out_dim, (maxq + 1) // 2) if sym else np.round(-xmin / scale)
    scales = scales.astype(np.float16)
    s, z = scales[g_idx].T.astype(np.float64), zeros[g_idx].T  # [out, in]
    intweight = np.clip(np.round(w / s) + z, 0, maxq).T.astype(np.uint32)  # [in, out]
    per_word = 32 // bits
    qweight = np.zeros((in_dim // per_word, out_dim), dtype=np.uint32)
    for row in range(in_dim // per_word):
        for j in range(per_word):
            qweight[row] |= intweight[row * per_word + j] << (bits * j)
    if not v2:
        assert zeros.min() >= 1, "a zero point of 0 does not survive GPTQ v1's zero - 1"
        zeros = zeros - 1
    zeros = zeros.astype(np.uint32)
    qzeros = np.zeros((num_groups, out_dim // per_word), dtype=np.uint32)
    for col in range(out_dim // per_word):
        for j in range(per_word):
            qzeros[:, col] |= zeros[:, col * per_word + j] << (bits * j)
    return {"qweight": i32(qweight), "qzeros": i32(qzeros), "scales": f16(scales), "g_idx": i32(g_idx)}


def gptq_dequantize(t, bits, v2):
    """As TGI's GPTQ reference (exllama) unpacks: shifts over words, g_idx per input row."""
    per_word, mask = 32 // bits, 2**bits - 1
    shifts = (np.arange(per_word) * bits).astype(np.uint32)
    words = t["qweight"][1].view(np.uint32)
    q = ((words[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, words.shape[1]).astype(np.int64)
    zwords = t["qzeros"][1].view(np.uint32)
    z = ((zwords[:, :, None] >> shifts[None, None, :]) & mask).reshape(zwords.shape[0], -1)
    z = z.astype(np.int64) + (0 if v2 else 1)
    g_idx = t["g_idx"][1].astype(np.int64)
    scales = t["scales"][1].astype(np.float64)
    return ((q - z[g_idx]) * scales[g_idx]).T


# ---------------------------------------------------------------- FP8 checkpoints

def fp8_quantize(w, per_channel, scale_dtype):
    absmax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max().reshape(1)
    scale = (absmax / 448.0).astype(np.float32)
    if scale_dtype == "BF16":
        scale, bits = bf16_round(scale)
        stored_scale = ("BF16", bits)
    else:
        stored_scale = f32(scale)
    codes = e4m3_encode(w.astype(np.float32) / scale)
    return {"weight": ("F8_E4M3", codes), "weight_scale": stored_scale}


def fp8_dequantize(t):
    dtype, scale = t["weight_scale"]
    if dtype == "BF16":
        scale = (scale.astype(np.uint32) << 16).view(np.float32)
    scale = scale.astype(np.float64)
    return e4m3_decode(t["weight"][1]) * (scale if scale.ndim == 2 else scale.reshape(1, 1))


# ---------------------------------------------------------------- at load (the shard's quantizers)

NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
FP4 = np.array([0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
                -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25],
               dtype=np.float32)


def at_load(w, flag):
    """float32 [out, in] -> the float32 values the shard holds after `--quantize flag`."""
    w = w.astype(np.float32)
    if flag == "fp8":
        scale = np.maximum(np.abs(w).max(axis=1, keepdims=True) / np.float32(448), np.finfo(np.float32).tiny)
        return e4m3_decode(e4m3_encode(w / scale)).astype(np.float32) * scale
    if flag == "bitsandbytes":
        absmax = np.abs(w).max(axis=1, keepdims=True)
        codes = np.rint(w * (np.float32(127) / absmax))
        return codes * (absmax / np.float32(127))
    table = NF4 if flag == "bitsandbytes-nf4" else FP4
    blocks = w.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    normed = blocks * (np.float32(1) / absmax)
    codes = np.abs(normed[:, :, None] - table[None, None, :]).argmin(axis=2)
    return (table[codes] * absmax).reshape(w.shape)


# ---------------------------------------------------------------- models

def quantization_config(kind, **p):
    if kind == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": p["group_size"], "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
    if kind == "gptq":
        return {"quant_method": "gptq", "bits": p["bits"], "group_size": p["group_size"],
                "desc_act": p["desc_act"], "sym": p["sym"], "damp_percent": 0.01, "true_sequential": True,
                "static_groups": False, "checkpoint_format": "gptq_v2" if p["v2"] else "gptq"}
    if kind == "compressed-tensors":
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "quantization_status": "compressed", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                                "strategy": "channel" if p["per_channel"] else "tensor"},
                    "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                          "dynamic": p["per_channel"],
                                          "strategy": "token" if p["per_channel"] else "tensor"}}}}
    assert kind == "fbgemm_fp8"
    return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}


# name -> (config overrides, quantization kind, its parameters). Each exercises a case.
MODELS = {
    "awq_g64": ({}, "awq", {"group_size": 64}),
    # Q/K/V biases (Qwen2 AWQ checkpoints keep theirs in f16).
    "awq_g128_qwen2": ({"model_type": "qwen2", "tie_word_embeddings": True}, "awq", {"group_size": 128}),
    "gptq_4bit_g32_act_order_asym": ({}, "gptq", {"bits": 4, "group_size": 32, "desc_act": True, "sym": False, "v2": False}),
    "gptq_4bit_g128_sym": ({}, "gptq", {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "v2": False}),
    "gptq_8bit_g64_act_order_sym": ({}, "gptq", {"bits": 8, "group_size": 64, "desc_act": True, "sym": True, "v2": False}),
    "gptq_4bit_per_column_v2": ({}, "gptq", {"bits": 4, "group_size": -1, "desc_act": False, "sym": False, "v2": True}),
    "fp8_channel": ({}, "compressed-tensors", {"per_channel": True}),
    "fp8_tensor": ({}, "compressed-tensors", {"per_channel": False}),
    "fbgemm_fp8": ({}, "fbgemm_fp8", {}),
}


def random_dense(cfg, rng):
    """Float32 weights of every tensor of the model."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = hidden // heads
    w = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, hidden)),
         "model.norm.weight": 1.0 + 0.1 * rng.standard_normal(hidden)}
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = rng.standard_normal((VOCAB, hidden)) / np.sqrt(hidden)
    shapes = {"self_attn.q_proj": (heads * d, hidden), "self_attn.k_proj": (kv_heads * d, hidden),
              "self_attn.v_proj": (kv_heads * d, hidden), "self_attn.o_proj": (hidden, heads * d),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1.0 + 0.1 * rng.standard_normal(hidden)
        w[p + "post_attention_layernorm.weight"] = 1.0 + 0.1 * rng.standard_normal(hidden)
        for name, shape in shapes.items():
            w[p + name + ".weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
        if cfg["model_type"] == "qwen2":
            for name in ("q_proj", "k_proj", "v_proj"):
                w[p + f"self_attn.{name}.bias"] = 0.3 * rng.standard_normal(shapes[f"self_attn.{name}"][0])
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_side_files(model_dir, cfg):
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    with open(os.path.join(model_dir, "tokenizer.json"), "w") as f:
        json.dump(word_level_tokenizer(), f)


def reference_logits(cfg, weights, sequences):
    ref_cfg = llama_ref.normalize_config(cfg)
    ref_weights = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    return [llama_ref.forward(ref_cfg, ref_weights, ids) for ids in sequences]


def write_quantized_model(out_dir, name, seed):
    overrides, kind, params = MODELS[name]
    rng = np.random.default_rng(1000 + seed)
    cfg = {**BASE, **overrides, "quantization_config": quantization_config(kind, **params)}
    dense = random_dense(cfg, rng)
    stored, reference = {}, {}
    for key, value in dense.items():
        module = key.rsplit(".", 1)[0].split(".", 3)[-1]
        if module in LINEARS and key.endswith(".weight"):
            prefix = key[: -len(".weight")]
            if kind == "awq":
                t = awq_quantize(value, params["group_size"])
                reference[key] = awq_dequantize(t, params["group_size"])
            elif kind == "gptq":
                t = gptq_quantize(value, params["bits"], params["group_size"], params["desc_act"],
                                  params["sym"], params["v2"], rng)
                reference[key] = gptq_dequantize(t, params["bits"], params["v2"])
            else:
                scale_dtype = "BF16" if kind == "compressed-tensors" and params["per_channel"] else "F32"
                t = fp8_quantize(value, kind == "fbgemm_fp8" or params["per_channel"], scale_dtype)
                if kind == "compressed-tensors" and not params["per_channel"]:
                    # A static activation scale, as llm-compressor's FP8 (non-dynamic) scheme stores.
                    t["input_scale"] = f32(np.array([0.05]))
                reference[key] = fp8_dequantize(t)
            # The stored codes stand for what the tool quantized: round to nearest of the grid.
            assert np.abs(reference[key] - value).max() < 0.6 * np.abs(value).max(), key
            stored.update({f"{prefix}.{n}": v for n, v in t.items()})
        else:
            stored[key] = f16(value)
            reference[key] = stored[key][1].astype(np.float64)
    model_dir = os.path.join(out_dir, name)
    os.makedirs(model_dir, exist_ok=True)
    save_safetensors(stored, os.path.join(model_dir, "model.safetensors"))
    write_side_files(model_dir, cfg)
    sequences = [rng.integers(3, VOCAB, size=n).tolist() for n in SEQUENCE_LENGTHS]
    write_expected(os.path.join(model_dir, "expected.safetensors"), sequences,
                   reference_logits(cfg, reference, sequences))


def write_dense_bf16(out_dir, seed):
    rng = np.random.default_rng(2000 + seed)
    cfg = {**BASE, "torch_dtype": "bfloat16"}
    dense = random_dense(cfg, rng)
    stored, values = {}, {}
    for key, value in dense.items():
        values[key], bits = bf16_round(value)
        stored[key] = ("BF16", bits)
    model_dir = os.path.join(out_dir, "dense_bf16")
    os.makedirs(model_dir, exist_ok=True)
    save_safetensors(stored, os.path.join(model_dir, "model.safetensors"))
    write_side_files(model_dir, cfg)
    sequences = [rng.integers(3, VOCAB, size=n).tolist() for n in SEQUENCE_LENGTHS]
    for flag in AT_LOAD:
        weights = {k: at_load(v, flag) if k.rsplit(".", 1)[0].split(".", 3)[-1] in LINEARS and k.endswith(".weight")
                   else v for k, v in values.items()}
        write_expected(os.path.join(model_dir, f"expected.{flag}.safetensors"), sequences,
                       reference_logits(cfg, weights, sequences))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("names", nargs="*", help=f"models to write (default: all of {sorted(MODELS)} and dense_bf16)")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for name in args.names:
        if name != "dense_bf16" and name not in MODELS:
            parser.error(f"unknown model {name!r}")
    write_all(args.out_dir, args.names or None)


def write_all(out_dir, names=None):
    """Writes `names` (default: every model) into out_dir; seeds are fixed per model."""
    for seed, name in enumerate([*MODELS, "dense_bf16"]):
        if names is not None and name not in names:
            continue
        if name == "dense_bf16":
            write_dense_bf16(out_dir, seed)
        else:
            write_quantized_model(out_dir, name, seed)
        print(f"wrote {os.path.join(out_dir, name)}")


if __name__ == "__main__":
    main()
