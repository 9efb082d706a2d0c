"""load.py end to end against a small fake OpenAI-compatible server on the loopback."""

import asyncio
import json
import threading
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")
tokenizers = pytest.importorskip("tokenizers")
from aiohttp import web  # noqa: E402

import load  # noqa: E402

LLAMA3_TOKENIZER = Path(__file__).resolve().parents[2] / ".bench-assets" / "llama3" / "tokenizer.json"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A small byte-level BPE, trained on the prompt filler, with a BOS template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([load.FILLER_TEXT] * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_prompts_have_exactly_the_requested_tokens(tokenizer_file):
    builder = load.PromptBuilder(tokenizers.Tokenizer.from_file(str(tokenizer_file)), seed=3)
    for n in (8, 17, 128, 1000):
        prompts = [builder.build(n) for _ in range(3)]
        assert all(builder.count(p) == n for p in prompts)
        assert len(set(prompts)) == 3


@pytest.mark.skipif(not LLAMA3_TOKENIZER.is_file(), reason="benchmark/fetch_tokenizer.sh not run")
def test_prompts_with_the_llama3_tokenizer():
    builder = load.PromptBuilder(tokenizers.Tokenizer.from_file(str(LLAMA3_TOKENIZER)))
    for n in (128, 512, 2048):
        assert builder.count(builder.build(n)) == n


class FakeServer:
    """Streams `max_tokens` chunks per completion and counts prompts with the tokenizer."""

    def __init__(self, tokenizer_file, status=200):
        self.tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        self.status = status
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies = []

    async def completions(self, request):
        body = await request.json()
        self.bodies.append(body)
        if self.status != 200:
            return web.json_response({"error": "overloaded"}, status=self.status)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(0.002)
                chunk = {"choices": [{"index": 0, "text": " x", "finish_reason": None}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            prompt_tokens = len(self.tokenizer.encode(body["prompt"]).ids)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": body["max_tokens"]}
            await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            return response
        finally:
            self.in_flight -= 1

    async def models(self, _request):
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})


@pytest.fixture
def serve():
    """Runs a FakeServer on 127.0.0.1 in a thread; yields its URL."""
    started = []

    def start(server):
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/completions", server.completions)
        app.router.add_get("/v1/models", server.models)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = runner.addresses[0][1]
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        started.append((loop, runner, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for loop, runner, thread in started:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def test_sweep_against_a_fake_server(serve, tokenizer_file, tmp_path, capsys):
    server = FakeServer(tokenizer_file)
    url = serve(server)
    out = tmp_path / "results.json"
    argv = ["--url", url, "--tokenizer", str(tokenizer_file), "--concurrency", "1,4", "--requests", "8",
            "--prompt-tokens", "64", "--max-tokens", "6", "--warmup-requests", "1", "--out", str(out)]
    assert load.main(argv) == 0
    levels = json.loads(out.read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    for level in levels:
        assert level["requests"] == 8 and level["errors"] == 0
        assert level["output_tokens"] == 48
        assert level["prompt_token_mismatches"] == 0 and level["short_outputs"] == 0
        assert level["ttft_ms_p50"] > 0 and level["itl_ms_p50"] > 0
        assert level["e2e_ms_p99"] >= level["e2e_ms_p50"]
    # 1 warmup + 16 measured requests, never more than 4 at once.
    assert len(server.bodies) == 17 and server.max_in_flight == 4
    body = server.bodies[-1]
    assert body["model"] == "fake-model"
    assert body["ignore_eos"] is True and body["temperature"] == 0 and body["stream"] is True
    table = capsys.readouterr().out
    assert "| sweep c=4 | 4 | 64 | 6 | 8 | 0 |" in table


def test_errors_are_counted_and_fail_the_run(serve, tokenizer_file, tmp_path):
    url = serve(FakeServer(tokenizer_file, status=503))
    out = tmp_path / "results.json"
    argv = ["--url", url, "--tokenizer", str(tokenizer_file), "--concurrency", "2", "--requests", "3",
            "--prompt-tokens", "16", "--max-tokens", "2", "--warmup-requests", "0", "--out", str(out)]
    assert load.main(argv) == 1
    (level,) = json.loads(out.read_text())["levels"]
    assert level["errors"] == 3
    assert level["error_samples"][0].startswith("HTTP 503")
    assert level["ttft_ms_p50"] is None


def test_unreachable_server_is_an_error_not_a_crash(tokenizer_file, tmp_path):
    argv = ["--url", "http://127.0.0.1:9", "--tokenizer", str(tokenizer_file), "--concurrency", "1",
            "--requests", "1", "--prompt-tokens", "16", "--max-tokens", "2", "--warmup-requests", "0"]
    assert load.main(argv) == 1


def test_sampling_preset_fields_are_sent(serve, tokenizer_file):
    server = FakeServer(tokenizer_file)
    argv = ["--url", serve(server), "--tokenizer", str(tokenizer_file), "--concurrency", "2", "--requests", "2",
            "--prompt-tokens", "16", "--max-tokens", "2", "--warmup-requests", "0", "--sampling", "t0.7-p0.9"]
    assert load.main(argv) == 0
    for body in server.bodies:
        assert (body["temperature"], body["top_p"]) == (0.7, 0.9)
        assert body["ignore_eos"] is True


def test_sampling_sweep_runs_every_preset_and_compares_with_greedy(serve, tokenizer_file, tmp_path, capsys):
    server = FakeServer(tokenizer_file)
    out = tmp_path / "results.json"
    argv = ["--url", serve(server), "--tokenizer", str(tokenizer_file), "--sampling-sweep", "--concurrency", "1,2",
            "--requests", "2", "--prompt-tokens", "16", "--max-tokens", "3", "--warmup-requests", "1", "--out", str(out)]
    assert load.main(argv) == 0
    levels = json.loads(out.read_text())["levels"]
    presets = list(load.SAMPLING_PRESETS)
    assert [(level["sampling"], level["concurrency"]) for level in levels] == [(p, c) for p in presets for c in (1, 2)]
    assert all(level["errors"] == 0 and level["output_tokens"] == 6 for level in levels)
    # One warmup per preset, then 2 requests per level; each body carries exactly its preset's fields.
    assert len(server.bodies) == len(presets) * 5
    sampling_keys = {"temperature", "top_p", "top_k", "repetition_penalty", "logprobs", "response_format"}
    sent = {json.dumps({k: v for k, v in body.items() if k in sampling_keys}, sort_keys=True) for body in server.bodies}
    assert sent == {json.dumps(fields, sort_keys=True) for fields in load.SAMPLING_PRESETS.values()}
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| preset | conc. |")
    assert "| greedy | 2 | 0 |" in table and "| logprobs5 | 1 | 0 |" in table


@pytest.mark.parametrize("extra", [
    ["--sampling-presets", "greedy,hot"],
    ["--sampling-sweep", "--sampling", "greedy"],
    ["--sampling-presets", "greedy"],
    ["--sampling-sweep", "--scenario"],
])
def test_inconsistent_sampling_options_are_usage_errors(tokenizer_file, extra):
    with pytest.raises(SystemExit) as exit_info:
        load.parse_args(["--tokenizer", str(tokenizer_file), *extra])
    assert exit_info.value.code == 2


def test_prefix_scenarios_share_a_system_prompt_then_grow_conversations(serve, tokenizer_file, tmp_path):
    server = FakeServer(tokenizer_file)
    out = tmp_path / "results.json"
    argv = ["--url", serve(server), "--tokenizer", str(tokenizer_file), "--prefix-scenarios",
            "--warmup-requests", "0", "--out", str(out)]
    assert load.main(argv) == 0
    levels = json.loads(out.read_text())["levels"]
    shared, chat = load.SHARED_PREFIX_LEVEL, load.CHAT
    assert [level["name"] for level in levels] == [shared.name] + [f"chat turn {t}" for t in range(1, chat.turns + 1)]
    assert all(level["errors"] == 0 and level["itl_ms_p99"] is not None for level in levels)
    assert levels[0]["prompt_token_mismatches"] == 0, "prompts of exactly 2048 tokens"
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    prompts = [body["prompt"] for body in server.bodies]
    system = [tokenizer.encode(p).ids for p in prompts[: shared.requests]]
    # The seam may tokenize differently; well before it every prompt is the same.
    assert len({tuple(ids[: shared.shared_prefix_tokens - 8]) for ids in system}) == 1
    assert len({tuple(ids) for ids in system}) == shared.requests, "distinct after the prefix"
    turns = prompts[shared.requests:]
    assert len(turns) == chat.conversations * chat.turns
    # Every turn after the first continues a conversation: the previous turn and its completion.
    previous = {p + " x" * chat.max_tokens for p in turns}
    assert sum(any(p.startswith(q) for q in previous) for p in turns) == chat.conversations * (chat.turns - 1)
