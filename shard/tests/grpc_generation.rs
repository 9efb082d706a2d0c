//! End-to-end tests of the shard binary over its gRPC unix socket, with the real
//! SmolLM2-135M-Instruct GGUF on CPU (`scripts/fetch-default-model.sh` fetches it).

use hyper_util::rt::TokioIo;
use model_store::ModelFiles;
use proto::v3::text_generation_service_client::TextGenerationServiceClient;
use proto::v3::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;
use tonic::transport::{Channel, Endpoint, Uri};

const BLOCK_SIZE: u32 = 16;
const PROMPT: &str = "The capital of France is";

fn model_path() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-default-model.sh",
        path.display()
    );
    path
}

/// The shard binary serving the default model on a temporary socket; SIGTERM on drop.
struct Shard {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Shard {
    fn spawn() -> Self {
        Self::spawn_with(&[])
    }

    fn spawn_with(extra_args: &[&str]) -> Self {
        let mut shard = Self::start(0, extra_args);
        shard.wait_listening();
        shard
    }

    /// Starts rank `rank` without waiting: the ranks of a group listen once all joined.
    fn start(rank: u32, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("shard");
        let child = Command::new(env!("CARGO_BIN_EXE_text-generation-shard"))
            .arg("--model-path")
            .arg(model_path())
            .arg("--uds-path")
            .arg(&prefix)
            .args(["--device", "cpu", "--block-size", &BLOCK_SIZE.to_string()])
            .args(["--rank", &rank.to_string()])
            .args(extra_args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            socket: PathBuf::from(format!("{}-{rank}", prefix.display())),
            _dir: dir,
        }
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.socket.exists() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("shard exited before listening: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "shard did not listen within 120 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    async fn client(&self) -> TextGenerationServiceClient<Channel> {
        let socket = self.socket.clone();
        let channel = Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        TextGenerationServiceClient::new(channel)
    }

    /// A client on a warmed-up shard whose cache holds 4096 tokens.
    async fn warm_client(&self) -> TextGenerationServiceClient<Channel> {
        let mut client = self.client().await;
        warm(&mut client).await;
        client
    }
}

/// Warms the shard up with a cache of 4096 tokens.
async fn warm(client: &mut TextGenerationServiceClient<Channel>) {
    let warmup = client
        .warmup(WarmupRequest {
            batch: Some(Batch {
                id: 0,
                requests: vec![],
                size: 0,
                max_tokens: 0,
                max_blocks: 0,
            }),
            max_input_tokens: 1024,
            max_prefill_tokens: 1024,
            max_total_tokens: 2048,
            max_batch_total_tokens: Some(4096),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(warmup.max_supported_total_tokens, 4096);
}

impl Shard {
    /// SIGTERM, as the launcher stops shards.
    fn terminate(&mut self) -> std::process::ExitStatus {
        if let Some(status) = self.child.try_wait().unwrap() {
            return status;
        }
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Hands out KV blocks as the router would (block 0 is reserved).
struct Blocks {
    next: u32,
}

impl Blocks {
    fn new() -> Self {
        Self { next: 1 }
    }

    fn request(&mut self, id: u64, prompt: &str, max_new_tokens: u32) -> Request {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        let tokenizer =
            TOKENIZER.get_or_init(|| ModelFiles::open(model_path()).unwrap().tokenizer().unwrap());
        let input_ids = tokenizer.encode(prompt, false).unwrap().get_ids().to_vec();
        let total = input_ids.len() as u32 + max_new_tokens;
        let blocks: Vec<u32> = (self.next..self.next + total.div_ceil(BLOCK_SIZE)).collect();
        self.next += blocks.len() as u32;
        let slots = blocks
            .iter()
            .flat_map(|b| b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE)
            .take(total as usize)
            .collect();
        Request {
            id,
            input_ids,
            inputs: prompt.to_string(),
            parameters: Some(NextTokenChooserParameters::greedy()),
            stopping_parameters: Some(StoppingCriteriaParameters {
                max_new_tokens,
                ..Default::default()
            }),
            blocks,
            slots,
            ..Default::default()
        }
    }
}

fn batch(id: u64, requests: Vec<Request>) -> Batch {
    Batch {
        id,
        size: requests.len() as u32,
        requests,
        max_tokens: 0,
        max_blocks: 0,
    }
}

/// Generated token ids and final texts by request id.
#[derive(Default, Debug)]
struct Outputs {
    tokens: HashMap<u64, Vec<u32>>,
    /// The streamed text of each token, concatenated.
    texts: HashMap<u64, String>,
    /// Whether the last streamed token was special.
    last_special: HashMap<u64, bool>,
    finished: HashMap<u64, GeneratedText>,
    /// Logprobs of the prompt tokens, for requests that asked for them.
    prompt_logprobs: HashMap<u64, Vec<f32>>,
}

impl Outputs {
    fn record(&mut self, generations: Vec<Generation>) {
        for g in generations {
            if let Some(prompt) = g.prefill_tokens {
                self.prompt_logprobs.insert(g.request_id, prompt.logprobs);
            }
            let tokens = g.tokens.unwrap();
            self.tokens
                .entry(g.request_id)
                .or_default()
                .extend(tokens.ids);
            self.texts
                .entry(g.request_id)
                .or_default()
                .push_str(&tokens.texts.concat());
            self.last_special.insert(g.request_id, tokens.is_special[0]);
            if let Some(text) = g.generated_text {
                self.finished.insert(g.request_id, text);
            }
        }
    }
}

async fn prefill(
    client: &mut TextGenerationServiceClient<Channel>,
    batch: Batch,
    outputs: &mut Outputs,
) -> Option<CachedBatch> {
    mixed_prefill(client, batch, None, outputs).await
}

/// A prefill that also decodes `cached` in the same forward pass.
async fn mixed_prefill(
    client: &mut TextGenerationServiceClient<Channel>,
    batch: Batch,
    cached: Option<CachedBatch>,
    outputs: &mut Outputs,
) -> Option<CachedBatch> {
    let response = client
        .prefill(PrefillRequest {
            batch: Some(batch),
            cached_batch: cached,
        })
        .await
        .unwrap()
        .into_inner();
    outputs.record(response.generations);
    response.batch
}

async fn decode(
    client: &mut TextGenerationServiceClient<Channel>,
    batches: Vec<CachedBatch>,
    outputs: &mut Outputs,
) -> Option<CachedBatch> {
    decode_with(client, batches, outputs, false).await
}

/// A decode step; with `run_ahead`, the shard starts the next one before answering.
async fn decode_with(
    client: &mut TextGenerationServiceClient<Channel>,
    batches: Vec<CachedBatch>,
    outputs: &mut Outputs,
    run_ahead: bool,
) -> Option<CachedBatch> {
    decode_timed(client, batches, outputs, run_ahead).await.0
}

/// [`decode_with`], also returning the shard's `forward_ns` for the step.
async fn decode_timed(
    client: &mut TextGenerationServiceClient<Channel>,
    batches: Vec<CachedBatch>,
    outputs: &mut Outputs,
    run_ahead: bool,
) -> (Option<CachedBatch>, u64) {
    let response = client
        .decode(DecodeRequest { batches, run_ahead })
        .await
        .unwrap()
        .into_inner();
    outputs.record(response.generations);
    (response.batch, response.forward_ns)
}

/// Prefills then decodes the batch until every request finished.
async fn generate(client: &mut TextGenerationServiceClient<Channel>, batch: Batch) -> Outputs {
    let mut outputs = Outputs::default();
    let mut cached = prefill(client, batch, &mut outputs).await;
    while let Some(batch) = cached {
        cached = decode(client, vec![batch], &mut outputs).await;
    }
    outputs
}

#[tokio::test(flavor = "multi_thread")]
async fn greedy_generation_info_and_health() {
    let shard = Shard::spawn();
    let mut client = shard.client().await;
    client
        .health(HealthRequest {})
        .await
        .expect("health before warmup");
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            info.block_size,
            info.device_type.as_str(),
            info.dtype.as_str()
        ),
        (BLOCK_SIZE, "cpu", "float32")
    );
    assert_eq!(
        (info.model_type.as_str(), info.rank, info.world_size),
        ("llama", 0, 1)
    );
    assert!(info.support_chunking && info.use_prefix_caching);
    assert!(info.quantization.contains("Q4_1"), "{}", info.quantization);
    let urls = client
        .service_discovery(ServiceDiscoveryRequest {})
        .await
        .unwrap()
        .into_inner()
        .urls;
    assert_eq!(urls, vec![format!("unix://{}", shard.socket.display())]);

    let mut client = shard.warm_client().await;
    let outputs = generate(
        &mut client,
        batch(1, vec![Blocks::new().request(1, PROMPT, 2)]),
    )
    .await;
    let text = &outputs.finished[&1];
    assert_eq!(text.text, " Paris.");
    assert_eq!(text.finish_reason, FinishReason::Length as i32);
    assert_eq!(text.generated_tokens, 2);
    assert_eq!(text.seed, None);
    client
        .health(HealthRequest {})
        .await
        .expect("health after warmup");
}

#[tokio::test(flavor = "multi_thread")]
async fn warmup_sizes_the_cache_from_the_cpu_budget() {
    let shard = Shard::spawn_with(&["--cpu-kv-cache-mb", "64"]);
    let mut client = shard.client().await;
    let mut blocks = Blocks::new();
    let long_prompt = "word ".repeat(200);
    // As the router's warmup: every sampling feature on.
    let mut requests = vec![
        blocks.request(1, &long_prompt, 1),
        blocks.request(2, PROMPT, 1),
    ];
    for request in &mut requests {
        request.parameters = Some(NextTokenChooserParameters {
            temperature: 0.9,
            top_k: 10,
            top_p: 0.9,
            typical_p: 0.9,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.2,
            frequency_penalty: 0.1,
            presence_penalty: 0.1,
            min_p: 0.05,
            ..NextTokenChooserParameters::greedy()
        });
        request.prefill_logprobs = true;
        request.top_n_tokens = 20;
    }
    let warmup_batch = batch(0, requests);
    let request = WarmupRequest {
        batch: Some(warmup_batch),
        max_input_tokens: 256,
        max_prefill_tokens: 512,
        max_total_tokens: 512,
        max_batch_total_tokens: None,
    };
    let warmup = client.warmup(request).await.unwrap().into_inner();
    // SmolLM2: 30 layers x 3 KV heads x 64 dims, keys and values in f32, 16-token blocks.
    let bytes_per_block = 2 * 30 * 3 * 64 * 4 * BLOCK_SIZE;
    let blocks = (64 << 20) / bytes_per_block;
    assert_eq!(warmup.max_supported_total_tokens, (blocks - 1) * BLOCK_SIZE);
    // Warmup leaves no batch behind, and the cache serves requests.
    let outputs = generate(
        &mut client,
        batch(1, vec![Blocks::new().request(1, PROMPT, 2)]),
    )
    .await;
    assert_eq!(outputs.finished[&1].text, " Paris.");
}

#[tokio::test(flavor = "multi_thread")]
async fn continuous_batching_does_not_change_greedy_tokens() {
    let shard = Shard::spawn();
    let mut client = shard.warm_client().await;
    let mut blocks = Blocks::new();
    let alone = generate(&mut client, batch(1, vec![blocks.request(1, PROMPT, 12)])).await;

    // The same request shares its batch with a short one, then a longer one joins.
    let mut outputs = Outputs::default();
    let first = batch(
        2,
        vec![
            blocks.request(10, PROMPT, 12),
            blocks.request(11, "Hello", 3),
        ],
    );
    let mut cached = prefill(&mut client, first, &mut outputs).await.unwrap();
    for _ in 0..3 {
        cached = decode(&mut client, vec![cached], &mut outputs)
            .await
            .unwrap();
    }
    // Request 11 finished (3 tokens): the router filters it out.
    assert!(outputs.finished.contains_key(&11));
    assert_eq!(cached.request_ids, vec![10]);
    let joining = batch(
        3,
        vec![blocks.request(12, "Once upon a time, in a faraway land, there", 20)],
    );
    let joined = prefill(&mut client, joining, &mut outputs).await.unwrap();
    let mut cached = decode(&mut client, vec![cached, joined], &mut outputs).await;
    while let Some(batch) = cached {
        let batch = if outputs.finished.contains_key(&10) && batch.request_ids.contains(&10) {
            let keep: Vec<u64> = batch
                .request_ids
                .iter()
                .copied()
                .filter(|&id| id != 10)
                .collect();
            let request = FilterBatchRequest {
                batch_id: batch.id,
                request_ids: keep,
            };
            client
                .filter_batch(request)
                .await
                .unwrap()
                .into_inner()
                .batch
                .unwrap()
        } else {
            batch
        };
        assert_eq!(batch.id, 2, "concatenation keeps the first batch's id");
        cached = decode(&mut client, vec![batch], &mut outputs).await;
    }
    assert_eq!(outputs.tokens[&10], alone.tokens[&1]);
    assert_eq!(outputs.finished[&10].text, alone.finished[&1].text);
    assert_eq!(outputs.tokens[&12].len(), 20);
    assert_eq!(
        outputs.texts[&12], outputs.finished[&12].text,
        "streamed texts add up to the text"
    );
}

/// Decode steps started ahead (`run_ahead`) give the tokens of steps run on request, and
/// serve the next step of their requests across a filter, a joining prefill that carries
/// the running batch, and a decode that appends a batch prefilled alone.
#[tokio::test(flavor = "multi_thread")]
async fn running_ahead_does_not_change_greedy_tokens() {
    let shard = Shard::spawn();
    let mut client = shard.warm_client().await;
    let mut blocks = Blocks::new();
    const JOINING: &str = "Once upon a time, in a faraway land, there";
    let alone = generate(&mut client, batch(1, vec![blocks.request(1, PROMPT, 16)])).await;
    // The joining request also wants its prompt's logprobs: rows of the pass that
    // follow those run ahead.
    let joiner = |blocks: &mut Blocks, id| Request {
        prefill_logprobs: true,
        ..blocks.request(id, JOINING, 4)
    };
    let mixed_alone = generate(&mut client, batch(2, vec![joiner(&mut blocks, 2)])).await;
    let appended_alone = generate(&mut client, batch(3, vec![blocks.request(3, JOINING, 6)])).await;

    let mut outputs = Outputs::default();
    let first = batch(
        4,
        vec![
            blocks.request(11, "Hello", 8),
            blocks.request(10, PROMPT, 16),
        ],
    );
    let mut cached = prefill(&mut client, first, &mut outputs).await.unwrap();
    let mut forward_ns = Vec::new();
    for _ in 0..2 {
        let (running, ns) = decode_timed(&mut client, vec![cached], &mut outputs, true).await;
        cached = running.unwrap();
        forward_ns.push(ns);
    }
    // The router drops request 11 (its client left): request 10's row of the step run
    // ahead serves.
    let request = FilterBatchRequest {
        batch_id: cached.id,
        request_ids: vec![10],
    };
    cached = client
        .filter_batch(request)
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    let (filtered, ns) = decode_timed(&mut client, vec![cached], &mut outputs, true).await;
    cached = filtered.unwrap();
    forward_ns.push(ns);
    // Those steps found their forward pass done (on a CPU a step run ahead is computed
    // before the previous one answers): they only waited for the device.
    for ns in &forward_ns[1..] {
        assert!(
            ns * 10 < forward_ns[0],
            "forward of steps run ahead: {forward_ns:?} ns"
        );
    }
    // A joining prefill carrying the running batch takes its step run ahead.
    let joining = batch(5, vec![joiner(&mut blocks, 12)]);
    cached = mixed_prefill(&mut client, joining, Some(cached), &mut outputs)
        .await
        .unwrap();
    cached = decode_with(&mut client, vec![cached], &mut outputs, true)
        .await
        .unwrap();
    // A batch prefilled alone, then decoded after the running one: the running
    // requests' tokens come from the step run ahead, and the new request waits for the
    // next pass rather than taking one of its own.
    let prefilled = prefill(
        &mut client,
        batch(6, vec![blocks.request(13, JOINING, 6)]),
        &mut outputs,
    )
    .await
    .unwrap();
    let mut cached = decode_with(&mut client, vec![cached, prefilled], &mut outputs, true).await;
    assert_eq!(
        outputs.tokens[&13].len(),
        1,
        "only the prefill's token so far"
    );
    assert_eq!(cached.as_ref().unwrap().size, 3);
    while let Some(running) = cached {
        cached = decode_with(&mut client, vec![running], &mut outputs, true).await;
    }
    assert_eq!(outputs.tokens[&10], alone.tokens[&1]);
    assert_eq!(outputs.finished[&10].text, alone.finished[&1].text);
    assert_eq!(outputs.tokens[&12], mixed_alone.tokens[&2]);
    let (mixed, alone) = (
        &outputs.prompt_logprobs[&12],
        &mixed_alone.prompt_logprobs[&2],
    );
    assert!(mixed.len() > 5 && mixed.len() == alone.len());
    assert!(mixed[0].is_nan() && alone[0].is_nan());
    for (m, a) in mixed[1..].iter().zip(&alone[1..]) {
        assert!(
            (m - a).abs() < 1e-4,
            "prompt logprobs {mixed:?} against {alone:?}"
        );
    }
    assert_eq!(outputs.tokens[&13], appended_alone.tokens[&3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mixed_prefill_decodes_the_cached_batch_in_the_same_pass() {
    let shard = Shard::spawn();
    let mut client = shard.warm_client().await;
    let mut blocks = Blocks::new();
    const JOINING: &str = "Once upon a time, in a faraway land, there";
    let alone_a = generate(&mut client, batch(1, vec![blocks.request(1, PROMPT, 10)])).await;
    let alone_b = generate(&mut client, batch(2, vec![blocks.request(2, JOINING, 8)])).await;

    let mut outputs = Outputs::default();
    let mut running = prefill(
        &mut client,
        batch(5, vec![blocks.request(20, PROMPT, 10)]),
        &mut outputs,
    )
    .await
    .unwrap();
    for _ in 0..2 {
        running = decode(&mut client, vec![running], &mut outputs)
            .await
            .unwrap();
    }
    assert_eq!(outputs.tokens[&20].len(), 3);
    let joining = batch(6, vec![blocks.request(21, JOINING, 8)]);
    let mut cached = mixed_prefill(&mut client, joining, Some(running.clone()), &mut outputs).await;
    let merged = cached.clone().unwrap();
    assert_eq!((merged.id, merged.request_ids.clone()), (6, vec![20, 21]));
    assert_eq!(
        outputs.tokens[&20].len(),
        4,
        "the running request advanced one token"
    );
    assert_eq!(
        outputs.tokens[&21].len(),
        1,
        "the new request got its first token"
    );
    let stale = client
        .decode(DecodeRequest {
            batches: vec![running],
            run_ahead: false,
        })
        .await;
    assert!(stale.is_err(), "the cached batch's id is consumed");
    while let Some(batch) = cached {
        cached = decode(&mut client, vec![batch], &mut outputs).await;
    }
    assert_eq!(outputs.tokens[&20], alone_a.tokens[&1]);
    assert_eq!(outputs.tokens[&21], alone_b.tokens[&2]);
}

/// A prompt of several KV blocks.
const LONG_PROMPT: &str = "The history of the city is long. It was founded on a river, grew into a \
    market town, and became a capital of trade and learning. Its university, its bridges \
    and its old quarter draw visitors from everywhere. Engineers drained the marshes and \
    laid railways along both banks of the river. Today, the city";

/// `request` with the first `cached_blocks` blocks of `cached` in place of its own, and
/// their tokens as its cached prefix (`cache_len`), as the router's prefix cache sends it.
fn with_cached_prefix(mut request: Request, cached: &Request, cached_blocks: usize) -> Request {
    request.blocks[..cached_blocks].copy_from_slice(&cached.blocks[..cached_blocks]);
    request.slots = request
        .blocks
        .iter()
        .flat_map(|b| b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE)
        .take(request.slots.len())
        .collect();
    request.cache_len = Some(cached_blocks as u32 * BLOCK_SIZE);
    request
}

/// `request` prefilling only `chunk_len` prompt tokens after its first `cache_len`.
fn chunk(request: &Request, cache_len: u32, chunk_len: u32) -> Request {
    Request {
        cache_len: Some(cache_len),
        chunk_len: Some(chunk_len),
        ..request.clone()
    }
}

/// A prompt prefilled from cached blocks, or in chunks (alone, then riding along with a
/// running batch's decode steps), gives the greedy tokens of one cold prefill.
#[tokio::test(flavor = "multi_thread")]
async fn cached_prefixes_and_chunked_prefills_give_the_tokens_of_a_cold_prefill() {
    let shard = Shard::spawn();
    let mut client = shard.warm_client().await;
    let mut blocks = Blocks::new();
    let cold_request = blocks.request(1, LONG_PROMPT, 8);
    let prompt_len = cold_request.input_ids.len() as u32;
    assert!(prompt_len > 3 * BLOCK_SIZE, "{prompt_len} tokens");
    let cold = generate(&mut client, batch(1, vec![cold_request.clone()])).await;
    assert_eq!(cold.tokens[&1].len(), 8);

    // The finished request's blocks still hold its prompt's keys and values.
    let hit = with_cached_prefix(blocks.request(2, LONG_PROMPT, 8), &cold_request, 3);
    let hit = generate(&mut client, batch(2, vec![hit])).await;
    assert_eq!(hit.tokens[&2], cold.tokens[&1], "cache hit");

    // Chunks of 20 tokens, alone: no token until the last chunk.
    let chunked = blocks.request(3, LONG_PROMPT, 8);
    let mut outputs = Outputs::default();
    let mut cache_len = 0;
    let mut id = 10;
    let mut cached = None;
    while cached.is_none() {
        let request = chunk(&chunked, cache_len, 20);
        cached = prefill(&mut client, batch(id, vec![request]), &mut outputs).await;
        cache_len += 20;
        id += 1;
        assert_eq!(cached.is_some(), cache_len >= prompt_len, "after {cache_len} tokens");
        assert_eq!(outputs.tokens.contains_key(&3), cached.is_some());
    }
    while let Some(batch) = cached {
        cached = decode(&mut client, vec![batch], &mut outputs).await;
    }
    assert_eq!(outputs.tokens[&3], cold.tokens[&1], "chunked alone");

    // Chunks of 30 tokens riding along with a running request's decode steps, the first
    // after a cached prefix.
    let alone = generate(&mut client, batch(20, vec![blocks.request(20, PROMPT, 12)])).await;
    let mut outputs = Outputs::default();
    let mut running = prefill(&mut client, batch(21, vec![blocks.request(21, PROMPT, 12)]), &mut outputs)
        .await
        .unwrap();
    let chunked = with_cached_prefix(blocks.request(4, LONG_PROMPT, 8), &cold_request, 1);
    let mut cache_len = BLOCK_SIZE;
    let mut id = 30;
    while !outputs.tokens.contains_key(&4) {
        let request = chunk(&chunked, cache_len, 30);
        running = mixed_prefill(&mut client, batch(id, vec![request]), Some(running), &mut outputs)
            .await
            .unwrap();
        cache_len += 30;
        id += 1;
        let expected: &[u64] = if cache_len >= prompt_len { &[21, 4] } else { &[21] };
        assert_eq!(running.request_ids, expected, "a chunk leaves the batch until its last");
    }
    let mut cached = Some(running);
    while let Some(batch) = cached {
        cached = decode(&mut client, vec![batch], &mut outputs).await;
    }
    assert_eq!(outputs.tokens[&4], cold.tokens[&1], "chunked with a running batch");
    assert_eq!(outputs.tokens[&21], alone.tokens[&20], "the running request");
}

#[tokio::test(flavor = "multi_thread")]
async fn eos_token_finishes_unless_ignored() {
    let shard = Shard::spawn();
    let mut client = shard.warm_client().await;
    let mut blocks = Blocks::new();
    let chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
    let mut ignoring = blocks.request(2, chat, 40);
    ignoring
        .stopping_parameters
        .as_mut()
        .unwrap()
        .ignore_eos_token = true;
    let outputs = generate(
        &mut client,
        batch(1, vec![blocks.request(1, chat, 40), ignoring]),
    )
    .await;
    let eos = &outputs.finished[&1];
    assert_eq!(eos.finish_reason, FinishReason::EosToken as i32, "{eos:?}");
    assert_eq!(outputs.tokens[&1].last(), Some(&2), "<|im_end|> is token 2");
    assert!(outputs.last_special[&1], "<|im_end|> is special");
    assert!(
        !eos.text.is_empty() && !eos.text.contains("<|im_end|>"),
        "{:?}",
        eos.text
    );
    let ignored = &outputs.finished[&2];
    assert_eq!(
        (ignored.finish_reason, ignored.generated_tokens),
        (FinishReason::Length as i32, 40)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_sampling_is_reproducible_across_batches() {
    let shard = Shard::spawn();
    let mut client = shard.warm_client().await;
    let mut blocks = Blocks::new();
    let sampled = |blocks: &mut Blocks, id: u64, seed: u64| {
        let mut request = blocks.request(id, "My favourite food is", 10);
        let parameters = request.parameters.as_mut().unwrap();
        parameters.do_sample = true;
        parameters.seed = seed;
        parameters.temperature = 1.5;
        request
    };
    // Both batches keep several rows in every step: on CPU the model computes one-row
    // matmuls on quantized activations and larger ones densely, which shifts the logits
    // slightly; the sampler's RNG itself does not depend on the batch.
    let first = batch(
        1,
        vec![blocks.request(1, PROMPT, 12), sampled(&mut blocks, 2, 42)],
    );
    let first = generate(&mut client, first).await;
    let second = vec![
        sampled(&mut blocks, 3, 7),
        blocks.request(4, "Hello", 12),
        sampled(&mut blocks, 5, 42),
    ];
    let second = generate(&mut client, batch(2, second)).await;
    assert_eq!(first.tokens[&2], second.tokens[&5]);
    assert_ne!(
        second.tokens[&3], second.tokens[&5],
        "different seeds gave the same 10 tokens"
    );
    assert_eq!(second.finished[&5].seed, Some(42));
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_sequence_and_length_finish_reasons() {
    let shard = Shard::spawn();
    let mut client = shard.warm_client().await;
    let mut blocks = Blocks::new();
    let mut stopped = blocks.request(1, PROMPT, 20);
    stopped.stopping_parameters.as_mut().unwrap().stop_sequences = vec!["ris".to_string()];
    let long = blocks.request(2, PROMPT, 5);
    let outputs = generate(&mut client, batch(1, vec![stopped, long])).await;
    let stop = &outputs.finished[&1];
    assert_eq!(stop.finish_reason, FinishReason::StopSequence as i32);
    assert_eq!(stop.text, " Paris", "the text includes the stop sequence");
    let length = &outputs.finished[&2];
    assert_eq!(
        (length.finish_reason, length.generated_tokens),
        (FinishReason::Length as i32, 5)
    );
    assert_eq!(outputs.tokens[&2].len(), 5);
}

/// Grammar-constrained requests, greedy and sampled, next to an unconstrained one: each
/// output matches its grammar and ends (EOS) when the grammar is complete.
#[tokio::test(flavor = "multi_thread")]
async fn grammars_constrain_the_output_and_end_it() {
    let shard = Shard::spawn();
    let mut client = shard.warm_client().await;
    let mut blocks = Blocks::new();
    let constrained = |blocks: &mut Blocks, id: u64, grammar_type: GrammarType, grammar: &str, seed: Option<u64>| {
        let mut request = blocks.request(id, PROMPT, 40);
        let parameters = request.parameters.as_mut().unwrap();
        parameters.grammar_type = grammar_type as i32;
        parameters.grammar = grammar.to_string();
        if let Some(seed) = seed {
            (parameters.do_sample, parameters.seed, parameters.temperature) = (true, seed, 1.5);
        }
        request
    };
    let schema = r#"{"type":"object","properties":{"city":{"type":"string","maxLength":20},"rank":{"type":"integer","minimum":0,"maximum":999}},"required":["city","rank"],"additionalProperties":false}"#;
    let requests = vec![
        constrained(&mut blocks, 2, GrammarType::Regex, "(yes|no), [0-9]{2}", None),
        blocks.request(3, PROMPT, 8),
        constrained(&mut blocks, 4, GrammarType::Json, schema, None),
        constrained(&mut blocks, 5, GrammarType::Json, schema, Some(9)),
        constrained(&mut blocks, 6, GrammarType::Lark, r#"start: "A" | "B""#, Some(3)),
    ];
    let outputs = generate(&mut client, batch(2, requests)).await;
    assert_eq!(outputs.tokens[&3].len(), 8);
    let regex = &outputs.finished[&2];
    assert_eq!(regex.finish_reason, FinishReason::EosToken as i32, "{regex:?}");
    let (answer, number) = regex.text.split_once(", ").expect("matches the regex");
    assert!(["yes", "no"].contains(&answer) && number.len() == 2 && number.bytes().all(|b| b.is_ascii_digit()), "{regex:?}");
    for id in [4, 5] {
        let json = &outputs.finished[&id];
        assert_eq!(json.finish_reason, FinishReason::EosToken as i32, "{json:?}");
        let value: serde_json::Value = serde_json::from_str(&json.text).expect("valid JSON");
        assert!(value["city"].is_string() && value["rank"].is_i64(), "{value}");
        assert_eq!(value.as_object().unwrap().len(), 2, "{value}");
    }
    assert!(["A", "B"].contains(&outputs.finished[&6].text.as_str()));
    // A grammar that does not parse fails the request's prefill, with the reason.
    let bad = constrained(&mut blocks, 7, GrammarType::Json, "{not json", None);
    let error = client
        .prefill(PrefillRequest { batch: Some(batch(3, vec![bad])), cached_batch: None })
        .await
        .unwrap_err();
    assert!(error.message().contains("JSON"), "{error:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn prefill_logprobs_and_top_n_tokens() {
    let shard = Shard::spawn();
    let mut client = shard.warm_client().await;
    let mut request = Blocks::new().request(1, PROMPT, 2);
    request.prefill_logprobs = true;
    request.top_n_tokens = 3;
    let prompt_len = request.input_ids.len();
    let response = client
        .prefill(PrefillRequest {
            batch: Some(batch(1, vec![request])),
            cached_batch: None,
        })
        .await
        .unwrap()
        .into_inner();
    let generation = &response.generations[0];
    let prefill = generation.prefill_tokens.as_ref().expect("prefill tokens");
    assert_eq!(
        (
            prefill.ids.len(),
            prefill.logprobs.len(),
            prefill.texts.len()
        ),
        (prompt_len, prompt_len, prompt_len)
    );
    assert!(prefill.logprobs[0].is_nan());
    assert!(prefill.logprobs[1..]
        .iter()
        .all(|&l| l.is_finite() && l <= 0.0));
    assert_eq!(prefill.texts.concat(), PROMPT);
    assert_eq!(generation.top_tokens.len(), 1);
    let top = &generation.top_tokens[0];
    assert_eq!(
        (top.ids.len(), top.logprobs.len(), top.texts.len()),
        (3, 3, 3)
    );
    assert!(top.logprobs.windows(2).all(|w| w[0] >= w[1]));
    let chosen = generation.tokens.as_ref().unwrap();
    assert_eq!(
        chosen.ids[0], top.ids[0],
        "greedy picks the most likely token"
    );
    assert!((chosen.logprobs[0] - top.logprobs[0]).abs() < 1e-5);
    assert_eq!(chosen.texts[0], " Paris");
    assert!(response.forward_ns > 0 && response.total_ns >= response.forward_ns);
}

#[tokio::test(flavor = "multi_thread")]
async fn clear_cache_drops_batches() {
    let shard = Shard::spawn();
    let mut client = shard.warm_client().await;
    let mut blocks = Blocks::new();
    let mut outputs = Outputs::default();
    let first = prefill(
        &mut client,
        batch(1, vec![blocks.request(1, PROMPT, 10)]),
        &mut outputs,
    )
    .await
    .unwrap();
    let second = prefill(
        &mut client,
        batch(2, vec![blocks.request(2, PROMPT, 10)]),
        &mut outputs,
    )
    .await
    .unwrap();
    client
        .clear_cache(ClearCacheRequest { id: Some(1) })
        .await
        .unwrap();
    let error = client
        .decode(DecodeRequest {
            batches: vec![first],
            run_ahead: false,
        })
        .await
        .unwrap_err();
    assert!(
        error.message().contains("batch 1 not found"),
        "{}",
        error.message()
    );
    let second = decode(&mut client, vec![second], &mut outputs)
        .await
        .unwrap();
    client
        .clear_cache(ClearCacheRequest { id: None })
        .await
        .unwrap();
    assert!(client
        .decode(DecodeRequest {
            batches: vec![second],
            run_ahead: false,
        })
        .await
        .is_err());

    let mut shard = shard;
    assert!(shard.terminate().success(), "SIGTERM is a clean exit");
    assert!(!shard.socket.exists(), "the socket is removed on exit");
}

#[test]
fn startup_errors_exit_with_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_text-generation-shard"))
        .args(["--model-path", "/definitely/not/a/model", "--uds-path"])
        .arg(dir.path().join("shard"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let logs = String::from_utf8_lossy(&output.stdout);
    assert!(logs.contains("/definitely/not/a/model"), "{logs}");
}

/// Tensor parallelism over quantized GGUF weights is refused by every rank of the group
/// with one clear error and exit code 1 (split quantized matrices do not yet reproduce one
/// rank's logits). Generation across ranks is tested on HF checkpoints in
/// tests/tensor_parallel.rs and, through the launcher, in integration-tests.
#[test]
fn tensor_parallel_quantized_gguf_is_refused_clearly() {
    const WORLD_SIZE: u32 = 2;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let ranks: Vec<_> = (0..WORLD_SIZE)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_text-generation-shard"))
                .arg("--model-path")
                .arg(model_path())
                .arg("--uds-path")
                .arg(dir.path().join("shard"))
                .args([
                    "--device",
                    "cpu",
                    "--rank",
                    &rank.to_string(),
                    "--world-size",
                    &WORLD_SIZE.to_string(),
                ])
                .args(["--master-addr", "127.0.0.1", "--master-port", &port])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, child) in ranks.into_iter().enumerate() {
        let output = child.wait_with_output().unwrap();
        assert_eq!(output.status.code(), Some(1), "rank {rank}");
        let logs = String::from_utf8_lossy(&output.stdout);
        assert!(
            logs.contains("tensor parallelism over quantized GGUF weights is not supported"),
            "rank {rank}: {logs}"
        );
    }
}
