#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server (ours, TGI, vLLM, ...).

Streams `/v1/completions` with prompts of an exact token length (counted with the
model's tokenizer.json), a fixed `max_tokens`, `ignore_eos` and greedy decoding (or the
sampling preset of `--sampling`), and reports per load level: aggregate output tokens/s,
TTFT, inter-token latency and end-to-end latency (p50/p99), and errors.

    # concurrency sweep
    python3 benchmark/load.py --url http://localhost:8080 --tokenizer MODEL/tokenizer.json
    # the issue's three targets
    python3 benchmark/load.py --url http://localhost:8080 --tokenizer MODEL/tokenizer.json --scenario
    # every sampling preset at 1, 64 and 256 streams, compared with greedy
    python3 benchmark/load.py --url http://localhost:8080 --tokenizer MODEL/tokenizer.json --sampling-sweep
    # prefix caching: a shared system prompt, and multi-turn chats (TTFT of every turn)
    python3 benchmark/load.py --url http://localhost:8080 --tokenizer MODEL/tokenizer.json --prefix-scenarios
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_stats import RequestResult, markdown_table, sampling_table, summarize  # noqa: E402

# Ordinary prose to cut prompts from: tokenizes like real text, unlike random ids.
FILLER_TEXT = (
    "The history of the city begins with a small settlement on the river, where traders "
    "exchanged grain, salt and timber with the farmers of the valley. Over the centuries "
    "the market grew into a town, the town built walls, bridges and a cathedral, and the "
    "merchants who lived there founded schools, hospitals and a university. Engineers later "
    "drained the marshes, laid railways along both banks and brought electric light to the "
    "streets; factories rose in the northern districts while parks and museums filled the "
    "old quarter. Today visitors walk along the quays, read in the libraries, listen to "
    "concerts in the squares and taste the cooking of a dozen regions in its restaurants. "
)


# The request fields of each `--sampling` preset, sent with every request of a level.
# A record of a dozen typed fields, enums and arrays: the json-schema preset's schema.
_RECORD_FIELDS = {
    "name": {"type": "string"},
    "age": {"type": "integer"},
    "email": {"type": "string"},
    "active": {"type": "boolean"},
    "score": {"type": "number"},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string"}},
    "city": {"type": "string"},
    "country": {"type": "string"},
    "zip": {"type": "string"},
    "level": {"enum": [1, 2, 3]},
    "scores": {"type": "array", "items": {"type": "integer"}},
}
RECORD_SCHEMA = {
    "type": "object",
    "properties": _RECORD_FIELDS,
    "required": list(_RECORD_FIELDS),
    "additionalProperties": False,
}
SAMPLING_PRESETS: dict[str, dict] = {
    # Today's default of every scenario, so that results stay comparable.
    "greedy": {"temperature": 0},
    # What a default OpenAI client sends: no sampling field (temperature 1, or the model's default).
    "default": {},
    "t0.7-p0.9": {"temperature": 0.7, "top_p": 0.9},
    # vLLM's extra body fields.
    "k50-rep1.1": {"top_k": 50, "repetition_penalty": 1.1},
    # The top-5 alternatives of each token with their log-probabilities.
    "logprobs5": {"temperature": 1, "logprobs": 5},
    # Structured output as OpenAI clients ask it, default sampling: every token masked by
    # the grammar of a dozen typed fields (outputs end when the JSON does: some stop short).
    "json-schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD_SCHEMA}}
    },
}
DEFAULT_CONCURRENCY = [1, 8, 32, 64, 128, 256]
SAMPLING_SWEEP_CONCURRENCY = [1, 64, 256]


@dataclass(frozen=True)
class Level:
    """Requests of one shape sent `concurrency` at a time."""

    name: str
    concurrency: int
    prompt_tokens: int
    max_tokens: int
    requests: int
    # A key of SAMPLING_PRESETS.
    sampling: str = "greedy"
    # Every prompt of the level starts with the same this many tokens (a system prompt).
    shared_prefix_tokens: int = 0


# The targets of the issue: single-stream decode, long-prompt prefill, a loaded server.
SCENARIOS = [
    Level("single stream 128/256", concurrency=1, prompt_tokens=128, max_tokens=256, requests=5),
    Level("prefill 2048", concurrency=1, prompt_tokens=2048, max_tokens=1, requests=5),
    Level("64 concurrent 512/128", concurrency=64, prompt_tokens=512, max_tokens=128, requests=128),
]


# Prefix caching: every prompt starts with the same 1,536 of its 2,048 tokens.
SHARED_PREFIX_LEVEL = Level(
    "shared prefix 1536/2048", concurrency=32, prompt_tokens=2048, max_tokens=128, requests=64,
    shared_prefix_tokens=1536,
)


@dataclass(frozen=True)
class Chat:
    """Conversations of `turns` turns, `concurrency` at a time: each turn sends the whole
    conversation so far (prompts and completions) plus a new message."""

    conversations: int
    turns: int
    message_tokens: int
    max_tokens: int


# Turn 8 comes to about 1,800 tokens: within run_gpu.sh's --max-input-tokens 2048.
CHAT = Chat(conversations=16, turns=8, message_tokens=160, max_tokens=64)


class PromptBuilder:
    """Distinct prompts of exactly N tokens as the server counts them (special tokens the
    tokenizer adds included), cut from ordinary prose."""

    ATTEMPTS = 8
    ADJUSTMENTS = 4

    def __init__(self, tokenizer: Tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.filler = tokenizer.encode(FILLER_TEXT, add_special_tokens=False).ids
        if not self.filler:
            raise ValueError("the tokenizer encodes the filler text to no tokens")
        self.rng = random.Random(seed)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def build(self, n_tokens: int) -> str:
        """A prompt of exactly `n_tokens` tokens. A random number in front and a random
        start in the filler keep prompts distinct: no shared prefix for a cache to reuse."""
        for _ in range(self.ATTEMPTS):
            prefix = f"{self.rng.randrange(10**6)}. "
            if self.count(prefix) >= n_tokens:
                prefix = ""
            text = self._fit(prefix, self.rng.randrange(len(self.filler)), n_tokens)
            if text is not None:
                return text
        raise ValueError(f"cannot build a prompt of exactly {n_tokens} tokens with this tokenizer")

    def extend(self, prefix: str, n_tokens: int) -> str:
        """`prefix` followed by distinct text, `n_tokens` tokens in all."""
        for _ in range(self.ATTEMPTS):
            text = self._fit(f"{prefix} {self.rng.randrange(10**6)}. ", self.rng.randrange(len(self.filler)), n_tokens)
            if text is not None:
                return text
        raise ValueError(f"cannot extend a prompt to exactly {n_tokens} tokens with this tokenizer")

    def _fit(self, prefix: str, start: int, n_tokens: int) -> str | None:
        length = n_tokens - self.count(prefix)
        for _ in range(self.ADJUSTMENTS):
            if length < 0:
                return None
            ids = [self.filler[(start + i) % len(self.filler)] for i in range(length)]
            text = prefix + self.tokenizer.decode(ids)
            # Decoding then encoding again can merge or split tokens at the seams: adjust.
            counted = self.count(text)
            if counted == n_tokens:
                return text
            length += n_tokens - counted
        return None


async def stream_completion(
    session: aiohttp.ClientSession, url: str, model: str | None, prompt: str, max_tokens: int, sampling: str
) -> RequestResult:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        **SAMPLING_PRESETS[sampling],
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    result = RequestResult()
    start = time.perf_counter()
    last_token_at = None
    streamed = 0
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                text = (await response.text())[:200]
                result.error = f"HTTP {response.status}: {text}"
                return result
            async for raw in response.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {str(chunk['error'])[:200]}"
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    streamed += 1
                    result.text += chunk["choices"][0].get("text") or ""
                    if last_token_at is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last_token_at)
                    last_token_at = now
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.output_tokens = usage.get("completion_tokens") or 0
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"[:200]
        return result
    result.latency = time.perf_counter() - start
    # Servers that send no usage: one streamed chunk per token.
    result.output_tokens = result.output_tokens or streamed
    if streamed == 0:
        result.error = "the stream ended without a token"
    return result


async def run_level(
    session: aiohttp.ClientSession, url: str, model: str | None, builder: PromptBuilder, level: Level
) -> dict:
    if level.shared_prefix_tokens:
        shared = builder.build(level.shared_prefix_tokens)
        prompts = [builder.extend(shared, level.prompt_tokens) for _ in range(level.requests)]
    else:
        prompts = [builder.build(level.prompt_tokens) for _ in range(level.requests)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[RequestResult] = []

    async def worker():
        while not queue.empty():
            prompt = queue.get_nowait()
            results.append(await stream_completion(session, url, model, prompt, level.max_tokens, level.sampling))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(level.concurrency, level.requests))))
    wall = time.perf_counter() - start
    summary = summarize(level.name, level.concurrency, level.prompt_tokens, level.max_tokens, results, wall)
    summary["sampling"] = level.sampling
    report(summary)
    return summary


async def run_chat(
    session: aiohttp.ClientSession, url: str, model: str | None, builder: PromptBuilder, chat: Chat, sampling: str
) -> list[dict]:
    """One summary per turn: the conversations run concurrently, each turn waiting for the
    previous one's completion."""
    turns: list[list[RequestResult]] = [[] for _ in range(chat.turns)]

    async def conversation():
        history = ""
        for turn in range(chat.turns):
            message = builder.build(chat.message_tokens)
            prompt = f"{history}\n\nUser: {message}\nAssistant:" if history else f"User: {message}\nAssistant:"
            result = await stream_completion(session, url, model, prompt, chat.max_tokens, sampling)
            turns[turn].append(result)
            if not result.ok:
                return
            history = prompt + result.text

    start = time.perf_counter()
    await asyncio.gather(*(conversation() for _ in range(chat.conversations)))
    wall = time.perf_counter() - start
    summaries = []
    for turn, results in enumerate(turns, 1):
        # The conversation so far grows by about a message and a completion per turn.
        prompt_tokens = turn * (chat.message_tokens + 8) + (turn - 1) * chat.max_tokens
        summary = summarize(f"chat turn {turn}", chat.conversations, prompt_tokens, chat.max_tokens, results, wall)
        summary["sampling"] = sampling
        # The server counts the conversation exactly; the length above is approximate.
        summary["prompt_token_mismatches"] = 0
        report(summary)
        summaries.append(summary)
    return summaries


def report(summary: dict) -> None:
    """A level's outcome and warnings, on stderr."""
    print(
        f"{summary['name']}: {summary['requests']} requests, {summary['errors']} errors, "
        f"{summary['output_tokens']} tokens in {summary['wall_s']:.1f}s",
        file=sys.stderr,
    )
    for sample in summary["error_samples"]:
        print(f"  error: {sample}", file=sys.stderr)
    if summary["prompt_token_mismatches"]:
        print(f"  warning: {summary['prompt_token_mismatches']} prompts counted differently by the server", file=sys.stderr)
    if summary["short_outputs"]:
        print(f"  warning: {summary['short_outputs']} requests stopped before max_tokens (ignore_eos ignored?)", file=sys.stderr)


async def served_model(session: aiohttp.ClientSession, url: str) -> str | None:
    """The first model `/v1/models` lists (vLLM needs its name); None when it lists none."""
    try:
        async with session.get(f"{url}/v1/models") as response:
            if response.status == 200:
                models = (await response.json()).get("data") or []
                return models[0].get("id") if models else None
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
        pass
    return None


def sweep_levels(args: argparse.Namespace) -> list[Level]:
    return [
        Level(
            f"sweep c={c}",
            concurrency=c,
            prompt_tokens=args.prompt_tokens,
            max_tokens=args.max_tokens,
            requests=args.requests or max(2 * c, 16),
            sampling=args.sampling,
        )
        for c in args.concurrency
    ]


def sampling_sweep_levels(args: argparse.Namespace) -> list[Level]:
    """Each preset at each concurrency. Few requests per level (3 for one stream, two waves
    up to 128 streams, one beyond) keep the whole sweep short."""
    return [
        Level(
            f"{preset} c={c}",
            concurrency=c,
            prompt_tokens=args.prompt_tokens,
            max_tokens=args.max_tokens,
            requests=args.requests or max(3, min(2 * c, 256)),
            sampling=preset,
        )
        for preset in args.sampling_presets
        for c in args.concurrency
    ]


def levels_to_run(args: argparse.Namespace) -> list[Level]:
    if args.sampling_sweep:
        return sampling_sweep_levels(args)
    if args.scenario:
        return [replace(level, sampling=args.sampling) for level in SCENARIOS]
    if args.prefix_scenarios:
        return [replace(SHARED_PREFIX_LEVEL, sampling=args.sampling)]
    return sweep_levels(args)


async def main_async(args: argparse.Namespace) -> list[dict]:
    builder = PromptBuilder(Tokenizer.from_file(str(args.tokenizer)), seed=args.seed)
    levels = levels_to_run(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # No connection cap: the concurrency of a level is the only limit.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        model = args.model or await served_model(session, args.url)
        if args.warmup_requests:
            # Each sampling preset once: its first requests may pay for one-time setup.
            prompt_tokens = min(level.prompt_tokens for level in levels)
            for sampling in dict.fromkeys(level.sampling for level in levels):
                warmup = Level(f"warmup {sampling}", 1, prompt_tokens, 16, args.warmup_requests, sampling)
                await run_level(session, args.url, model, builder, warmup)
        results = [await run_level(session, args.url, model, builder, level) for level in levels]
        if args.prefix_scenarios:
            results += await run_chat(session, args.url, model, builder, CHAT, args.sampling)
        return results


def preset_names(text: str) -> list[str]:
    names = text.split(",")
    unknown = [name for name in names if name not in SAMPLING_PRESETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sampling presets {unknown}; known: {', '.join(SAMPLING_PRESETS)}")
    return names


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers of at least 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:8080", help="server base URL")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the model's tokenizer.json")
    parser.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--scenario", action="store_true", help="run the issue's three targets instead of the sweep")
    mode.add_argument(
        "--prefix-scenarios",
        action="store_true",
        help=f"run the prefix caching scenarios: {SHARED_PREFIX_LEVEL.concurrency} streams of "
        f"{SHARED_PREFIX_LEVEL.prompt_tokens}-token prompts sharing their first {SHARED_PREFIX_LEVEL.shared_prefix_tokens}, "
        f"then {CHAT.conversations} chats of {CHAT.turns} turns (TTFT of each turn)",
    )
    mode.add_argument(
        "--sampling-sweep",
        action="store_true",
        help="run every preset of --sampling-presets at each concurrency (default 1,64,256) and compare them with greedy",
    )
    parser.add_argument(
        "--sampling", choices=SAMPLING_PRESETS, help="sampling preset of the sweep or the scenarios (default: greedy)"
    )
    parser.add_argument(
        "--sampling-presets", type=preset_names, help="comma-separated presets of --sampling-sweep (default: all)"
    )
    # The sweeps' shape; --scenario has its own.
    parser.add_argument(
        "--concurrency",
        type=positive_ints,
        help=f"sweep levels (default {','.join(map(str, DEFAULT_CONCURRENCY))}; "
        f"{','.join(map(str, SAMPLING_SWEEP_CONCURRENCY))} for --sampling-sweep)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=512, help="sweep prompt length, in tokens")
    parser.add_argument("--max-tokens", type=int, default=128, help="sweep tokens to generate")
    parser.add_argument(
        "--requests",
        type=int,
        help="sweep requests per level (default: max(2 x concurrency, 16); "
        "max(3, min(2 x concurrency, 256)) for --sampling-sweep)",
    )
    parser.add_argument("--warmup-requests", type=int, default=2, help="untimed requests first")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1 or args.max_tokens < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--prompt-tokens, --max-tokens and --requests must be at least 1")
    if not args.tokenizer.is_file():
        parser.error(f"--tokenizer {args.tokenizer} is not a file")
    if args.sampling_sweep and args.sampling:
        parser.error("--sampling-sweep runs the presets of --sampling-presets, not --sampling")
    if args.sampling_presets and not args.sampling_sweep:
        parser.error("--sampling-presets is for --sampling-sweep; use --sampling otherwise")
    args.sampling = args.sampling or "greedy"
    args.sampling_presets = args.sampling_presets or list(SAMPLING_PRESETS)
    args.concurrency = args.concurrency or (SAMPLING_SWEEP_CONCURRENCY if args.sampling_sweep else DEFAULT_CONCURRENCY)
    args.url = args.url.rstrip("/")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        levels = asyncio.run(main_async(args))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        settings.pop("api_key")
        args.out.write_text(json.dumps({"settings": settings, "levels": levels}, indent=2))
    print(sampling_table(levels) if args.sampling_sweep else markdown_table(levels))
    return 1 if any(level["errors"] for level in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
