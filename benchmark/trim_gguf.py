#!/usr/bin/env python3
"""Writes a copy of a llama-family GGUF that keeps only some of its transformer blocks.

The real weights of the kept blocks (renumbered in order), the embeddings, the final
norm and the tokenizer stay as they are; keeping the first and the last blocks, the
smaller model still predicts peaked, meaningful tokens: enough
to check that two builds of the shard (CPU and CUDA) choose the same greedy tokens, on a
machine that a whole model cannot be carried to (SmolLM2-135M Q4_1 is 98 MB).

    python3 benchmark/trim_gguf.py models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        .bench-assets/smollm2-trimmed.gguf --layers 0-3,26-29
"""

import argparse
import re
import sys

import gguf


def parse_layers(spec: str) -> list[int]:
    """`0-3,26-29` -> [0, 1, 2, 3, 26, 27, 28, 29]."""
    layers = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        layers.extend(range(int(first), int(last or first) + 1))
    return layers


def trim(src: str, dst: str, layers: list[int]) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    block_count_key = f"{arch}.block_count"
    total = reader.fields[block_count_key].contents()
    if not layers or layers != sorted(set(layers)) or layers[-1] >= total:
        sys.exit(f"trim_gguf.py: --layers must name distinct blocks of 0..{total - 1} in order")
    renumber = {old: new for new, old in enumerate(layers)}
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        # The writer sets these itself (architecture) or they describe the file layout.
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = len(layers) if name == block_count_key else field.contents()
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        name = tensor.name
        block = re.match(r"blk\.(\d+)\.", name)
        if block:
            if int(block.group(1)) not in renumber:
                continue
            name = f"blk.{renumber[int(block.group(1))]}.{name[block.end():]}"
        # `data` is shaped in bytes per row for quantized types: the writer converts back.
        writer.add_tensor(name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--layers", type=parse_layers, required=True, help="blocks to keep, e.g. 0-3,26-29")
    args = parser.parse_args()
    trim(args.src, args.dst, args.layers)


if __name__ == "__main__":
    main()
