//! Tensor parallelism on CPU: groups of in-process ranks (one thread each, joined over
//! the TCP communicator like shard processes are) load their share of a model and must
//! produce the logits and greedy tokens of the whole model on one rank.
//!
//! The tiny models come from `python shard/reference/make_fixtures.py DIR` with
//! `SHARD_FIXTURES=DIR`; the SmolLM2 test reads the GGUF from `SHARD_GGUF` (default: the
//! workspace's models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf).

mod common;

use candle_core::{DType, Device, Tensor};
use model_store::quantization::QuantizeArg;
use model_store::ModelFiles;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;
use text_generation_shard::cache::KvCache;
use text_generation_shard::dist::{self, Rendezvous};
use text_generation_shard::models::{load_model_shard, ForwardBatch, Model, SequenceInput};

const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: usize = 16;
const DECODE_STEPS: usize = 6;

fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var("SHARD_FIXTURES").unwrap_or_else(|_| {
        panic!("SHARD_FIXTURES is not set: run `python shard/reference/make_fixtures.py DIR` and set SHARD_FIXTURES=DIR")
    });
    let path = PathBuf::from(dir).join(name);
    assert!(path.is_dir(), "fixture {} missing", path.display());
    path
}

/// What one rank saw: the prompt's logits, then each decode step's, and the greedy tokens.
struct Generation {
    logits: Vec<Tensor>,
    tokens: Vec<u32>,
}

/// Prefills `prompt`, then decodes greedily for `DECODE_STEPS` tokens.
fn generate(model: &dyn Model, prompt: &[u32]) -> Generation {
    let device = Device::Cpu;
    let mut cache = KvCache::new(model.spec(), NUM_BLOCKS, BLOCK_SIZE, &device).unwrap();
    // Blocks backwards, so slots are not in position order.
    let block_table: Vec<u32> = (0..NUM_BLOCKS as u32).rev().collect();
    let slots: Vec<u32> = (0..NUM_BLOCKS * BLOCK_SIZE)
        .map(|p| block_table[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32)
        .collect();
    let mut tokens = prompt.to_vec();
    let mut logits = Vec::new();
    let mut cached = 0;
    for _ in 0..=DECODE_STEPS {
        let new = &tokens[cached..];
        let rows: Vec<u32> = (0..new.len() as u32).collect();
        let seq = SequenceInput {
            new_token_ids: new,
            start_position: cached,
            slots: &slots,
            block_table: &block_table,
        };
        let batch = ForwardBatch::new(&[seq], &rows, &device).unwrap();
        let step = model.forward(&batch, &mut cache).unwrap();
        assert_eq!(step.dims(), &[new.len(), model.spec().vocab_size]);
        cached = tokens.len();
        let last = step.get(new.len() - 1).unwrap();
        tokens.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
        logits.push(step);
    }
    Generation {
        logits,
        tokens: tokens[prompt.len()..].to_vec(),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `generate` on every rank of a group of `world_size` threads; results in rank order.
fn generate_sharded(
    path: &Path,
    world_size: usize,
    quantize: Option<QuantizeArg>,
    prompt: &[u32],
) -> Vec<Generation> {
    let rendezvous = Rendezvous {
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
        timeout: Duration::from_secs(60),
    };
    std::thread::scope(|scope| {
        let ranks: Vec<_> = (0..world_size)
            .map(|rank| {
                let rendezvous = rendezvous.clone();
                scope.spawn(move || {
                    let comm =
                        dist::connect(rank, world_size, Some(&rendezvous), dist::Transport::Tcp, &Device::Cpu).unwrap();
                    let files = ModelFiles::open(path).unwrap();
                    let model = load_model_shard(&files, &Device::Cpu, DType::F32, quantize, &comm)
                        .unwrap_or_else(|e| {
                            panic!("rank {rank} loading {}: {e:#}", path.display())
                        });
                    generate(model.as_ref(), prompt)
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

/// Max of `|a - b| / (1 + |b|)`.
fn max_relative_error(actual: &Tensor, expected: &Tensor) -> f32 {
    let diff = (actual - expected).unwrap().abs().unwrap();
    let scale = (expected.abs().unwrap() + 1.0).unwrap();
    (diff / scale)
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The group's ranks agree bit for bit, and with one rank up to summation order.
fn assert_matches_one_rank(path: &Path, world_size: usize, prompt: &[u32], tolerance: f32) {
    assert_quantized_matches_one_rank(path, None, world_size, prompt, tolerance)
}

fn assert_quantized_matches_one_rank(
    path: &Path,
    quantize: Option<QuantizeArg>,
    world_size: usize,
    prompt: &[u32],
    tolerance: f32,
) {
    let single = generate_sharded(path, 1, quantize, prompt).remove(0);
    let ranks = generate_sharded(path, world_size, quantize, prompt);
    let name = path.display();
    for (rank, generation) in ranks.iter().enumerate() {
        // Step by step: logits first, so a failure says how far they were apart.
        for (step, (sharded, whole)) in generation.logits.iter().zip(&single.logits).enumerate() {
            let err = max_relative_error(sharded, whole);
            assert!(
                err < tolerance,
                "{name}, {world_size} ranks: rank {rank}, step {step}: logits off by {err}"
            );
            assert_eq!(
                generation.tokens[step], single.tokens[step],
                "{name}, {world_size} ranks: rank {rank}'s greedy token at step {step} (logits off by {err})"
            );
            let rank_0 = &ranks[0].logits[step];
            let identical = (sharded - rank_0)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                == 0.0;
            assert!(
                identical,
                "{name}: rank {rank}'s logits differ from rank 0's at step {step}"
            );
        }
    }
}

const TINY_PROMPT: &[u32] = &[1, 17, 42, 5, 88, 23, 61];

/// Every family member on two ranks: MHA, GQA with tied embeddings, q/k/v biases, one KV
/// head (replicated on both ranks), sharded safetensors, q/k norms, and an f32 GGUF.
#[test]
fn tiny_models_on_two_ranks_match_one_rank() {
    for name in [
        "llama_mha",
        "llama3_gqa_tied",
        "qwen2_bias",
        "mistral_window",
        "qwen3_qknorm",
        "llama3_gguf",
    ] {
        assert_matches_one_rank(&fixture(name), 2, TINY_PROMPT, 1e-4);
    }
}

/// Quantized weights split along whole packed words and groups: AWQ with a group
/// wider than a rank's inputs (o_proj), act-order GPTQ (each rank's rows read the groups
/// their g_idx names), 8-bit GPTQ, FP8 per-channel scales, and NF4 blocks quantized whole
/// at load then cut.
#[test]
fn quantized_models_on_two_ranks_match_one_rank() {
    for name in [
        "awq_g128_qwen2",
        "gptq_4bit_g32_act_order_asym",
        "gptq_8bit_g64_act_order_sym",
        "fp8_channel",
    ] {
        assert_matches_one_rank(&fixture(name), 2, TINY_PROMPT, 1e-4);
    }
    assert_quantized_matches_one_rank(
        &fixture("dense_bf16"),
        Some(QuantizeArg::BitsandbytesNf4),
        2,
        TINY_PROMPT,
        1e-4,
    );
}

/// Four ranks over two KV heads: each KV head lives on two ranks.
#[test]
fn kv_heads_are_replicated_when_fewer_than_ranks() {
    assert_matches_one_rank(&fixture("llama3_gqa_tied"), 4, TINY_PROMPT, 1e-4);
}

/// Quantized GGUF weights are refused on several ranks with a clear error.
#[test]
fn quantized_gguf_on_several_ranks_is_a_clear_error() {
    let errors = load_errors(&common::smollm2_gguf(), 3);
    for err in errors {
        assert!(err.contains("quantized GGUF"), "{err}");
    }
}

/// The loading error of every rank of a group of `world_size` ranks.
fn load_errors(path: &Path, world_size: usize) -> Vec<String> {
    let rendezvous = Rendezvous {
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
        timeout: Duration::from_secs(60),
    };
    std::thread::scope(|scope| {
        let ranks: Vec<_> = (0..world_size)
            .map(|rank| {
                let rendezvous = rendezvous.clone();
                scope.spawn(move || {
                    let comm =
                        dist::connect(rank, world_size, Some(&rendezvous), dist::Transport::Tcp, &Device::Cpu).unwrap();
                    let files = ModelFiles::open(path).unwrap();
                    match load_model_shard(&files, &Device::Cpu, DType::F32, None, &comm) {
                        Ok(_) => panic!("rank {rank} loaded {}", path.display()),
                        Err(e) => format!("{e:#}"),
                    }
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

/// A model whose heads do not split over the ranks fails to load with a clear error.
#[test]
fn indivisible_heads_are_a_clear_error() {
    for err in load_errors(&fixture("llama_mha"), 3) {
        assert!(
            err.contains("not divisible by the number of shards (3)"),
            "{err}"
        );
    }
}
