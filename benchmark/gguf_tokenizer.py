#!/usr/bin/env python3
"""Writes the tokenizer.json of a GGUF file's BPE tokenizer (`tokenizer.ggml.model`
"gpt2"), as model-store builds it for the server: the GGUF's vocabulary and merges,
byte-level pre-tokenization (digits split first for `tokenizer.ggml.pre` "smollm"),
its control tokens as special tokens. benchmark/load.py counts prompt tokens with it.

    python3 benchmark/gguf_tokenizer.py MODEL.gguf OUT/tokenizer.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

CONTROL_TOKEN = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


def field(reader: GGUFReader, key: str):
    value = reader.get_field(key)
    return None if value is None else value.contents()


def tokenizer_from_gguf(path: Path) -> Tokenizer:
    reader = GGUFReader(path)
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        raise SystemExit(f"{path}: only GPT-2-style BPE tokenizers are supported")
    tokens: list[str] = field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if field(reader, "tokenizer.ggml.pre") == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    types = field(reader, "tokenizer.ggml.token_type") or []
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True) for i, kind in enumerate(types) if kind == CONTROL_TOKEN]
    )
    return tokenizer


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    out = Path(sys.argv[2])
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_from_gguf(Path(sys.argv[1])).save(str(out))


if __name__ == "__main__":
    main()
