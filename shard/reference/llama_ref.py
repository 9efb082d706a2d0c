"""Independent numpy reference of the Llama-family forward pass.

Written from the Hugging Face modeling code's semantics (not from the Rust shard): full
causal attention over one whole sequence in float64, no KV cache, no paging. Covers
Llama 2/3 (llama3 rope scaling), Mistral (sliding window), Qwen2 (q/k/v biases),
Qwen3 (q/k head RMSNorm), tied or untied embeddings, grouped-query attention.

Checkpoints: an HF-layout directory (config.json + safetensors, read with the
`safetensors` numpy API) or a GGUF file (read and dequantized with the `gguf` package;
llama.cpp's Q/K row permutation is undone so the HF rotation applies).

Usage as a library (see make_fixtures.py):
    cfg, weights = load_hf(path)            # or load_gguf(path)
    logits = forward(cfg, weights, [1, 2, 3])   # float64 [tokens, vocab]

Needs: numpy, safetensors, gguf (pip install numpy safetensors gguf).
"""

import json
import os

import numpy as np


def load_hf(model_dir):
    """Config dict and {hf_name: float64 array} from an HF-layout directory."""
    from safetensors.numpy import load_file

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for name in files:
        for key, value in load_file(os.path.join(model_dir, name)).items():
            weights[key] = value.astype(np.float64)
    return normalize_config(cfg), weights


def normalize_config(cfg):
    """Fills the defaults the HF config classes apply."""
    cfg = dict(cfg)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    if cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.setdefault("rope_theta", 10000.0)
    cfg.setdefault("rms_norm_eps", 1e-6)
    cfg.setdefault("tie_word_embeddings", False)
    model_type = cfg["model_type"]
    if cfg.get("attention_bias") is None:
        cfg["attention_bias"] = model_type == "qwen2"
    # Qwen's sliding window only applies when switched on, from max_window_layers on.
    window = cfg.get("sliding_window")
    layers = cfg["num_hidden_layers"]
    if model_type in ("qwen2", "qwen3"):
        if cfg.get("use_sliding_window") and window:
            start = cfg.get("max_window_layers") or 0
            cfg["layer_windows"] = [window if i >= start else None for i in range(layers)]
        else:
            cfg["layer_windows"] = [None] * layers
    else:
        cfg["layer_windows"] = [window] * layers
    return cfg


# llama.cpp tensor names -> HF names.
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute(w, n_head):
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` of Q/K rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path):
    """Config dict and dequantized {hf_name: float64 array} from a GGUF file."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    heads = int(field(f"{arch}.attention.head_count"))
    kv_heads = int(field(f"{arch}.attention.head_count_kv", heads))
    hidden = int(field(f"{arch}.embedding_length"))
    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float64)
        name = t.name
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        elif name == "rope_freqs.weight":
            hf = "rope_freqs"
        else:
            _, layer, module, param = name.split(".")
            hf = f"model.layers.{layer}.{_GGUF_LAYER_NAMES[module]}.{param}"
            if arch == "llama" and module in ("attn_q", "attn_k") and param == "weight":
                w = _unpermute(w, heads if module == "attn_q" else kv_heads)
        weights[hf] = w
    vocab = field(f"{arch}.vocab_size")
    if vocab is None:
        vocab = weights["model.embed_tokens.weight"].shape[0]
    cfg = {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(field(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(field(f"{arch}.attention.key_length", hidden // heads)),
        "vocab_size": int(vocab),
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "attention_bias": arch == "qwen2",
    }
    return normalize_config(cfg), weights


def inverse_frequencies(cfg, weights):
    d = cfg["head_dim"]
    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d)
    if "rope_freqs" in weights:
        return inv_freq / weights["rope_freqs"]
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind} not in the reference")
    # transformers' _compute_llama3_parameters
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * np.pi / inv_freq
    llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * llama / factor + smooth * llama
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, llama)


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def forward(cfg, weights, token_ids):
    """float64 logits [len(token_ids), vocab] of one sequence starting at position 0."""
    W = weights
    ids = np.asarray(token_ids)
    n = len(ids)
    heads, kv_heads, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    angles = np.arange(n, dtype=np.float64)[:, None] * inverse_frequencies(cfg, W)[None, :]
    emb = np.concatenate([angles, angles], axis=-1)  # [n, d]
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    x = W["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."

        def proj(name, h):
            y = h @ W[p + name + ".weight"].T
            bias = W.get(p + name + ".bias")
            return y if bias is None else y + bias

        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = proj("self_attn.q_proj", h).reshape(n, heads, d)
        k = proj("self_attn.k_proj", h).reshape(n, kv_heads, d)
        v = proj("self_attn.v_proj", h).reshape(n, kv_heads, d)
        if p + "self_attn.q_norm.weight" in W:
            q = rms_norm(q, W[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, W[p + "self_attn.k_norm.weight"], eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = heads // kv_heads
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        qpos, kpos = np.arange(n)[:, None], np.arange(n)[None, :]
        allowed = kpos <= qpos
        window = cfg["layer_windows"][i]
        if window:
            allowed &= (qpos - kpos) < window
        scores = np.where(allowed[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * d)
        x = x + proj("self_attn.o_proj", attn)
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        gate = proj("mlp.gate_proj", h)
        x = x + proj("mlp.down_proj", gate / (1 + np.exp(-gate)) * proj("mlp.up_proj", h))
    x = rms_norm(x, W["model.norm.weight"], eps)
    lm_head = W.get("lm_head.weight")
    if lm_head is None or cfg["tie_word_embeddings"]:
        lm_head = W["model.embed_tokens.weight"]
    return x @ lm_head.T
