//! The shard's models against the independent numpy reference (shard/reference/).
//!
//! Fixtures come from `python shard/reference/make_fixtures.py DIR` (see its docstring);
//! point `SHARD_FIXTURES` at DIR. The SmolLM2 tests read the GGUF from `SHARD_GGUF`
//! (default: the workspace's models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf).

mod common;

use candle_core::{DType, Device, Tensor};
use model_store::ModelFiles;
use std::collections::HashMap;
use std::path::PathBuf;
use text_generation_shard::cache::KvCache;
use model_store::quantization::QuantizeArg;
use std::sync::Arc;
use text_generation_shard::dist::{Comm, SingleRank};
use text_generation_shard::models::{load_model_shard, ForwardBatch, Model, SequenceInput};

/// HF-layout models, and `llama3_gguf`: the Llama 3 one converted to GGUF (f32) as llama.cpp does.
const TINY_MODELS: &[&str] = &[
    "llama_mha",
    "llama3_gqa_tied",
    "qwen2_bias",
    "mistral_window",
    "qwen3_qknorm",
    "llama3_gguf",
];
const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: usize = 64;

fn fixtures_dir() -> PathBuf {
    let dir = std::env::var("SHARD_FIXTURES").unwrap_or_else(|_| {
        panic!("SHARD_FIXTURES is not set: run `python shard/reference/make_fixtures.py DIR` and set SHARD_FIXTURES=DIR")
    });
    let dir = PathBuf::from(dir);
    assert!(
        dir.is_dir(),
        "SHARD_FIXTURES={} is not a directory: generate it with shard/reference/make_fixtures.py",
        dir.display()
    );
    dir
}

/// Quantized checkpoints of shard/reference/make_quantized.py (written by make_fixtures.py).
const QUANTIZED_MODELS: &[(&str, &str)] = &[
    ("awq_g64", "awq:4bit-g64"),
    ("awq_g128_qwen2", "awq:4bit-g128"),
    ("gptq_4bit_g32_act_order_asym", "gptq:4bit-g32-act-order-asym"),
    ("gptq_4bit_g128_sym", "gptq:4bit-g128-sym"),
    ("gptq_8bit_g64_act_order_sym", "gptq:8bit-g64-act-order-sym"),
    ("gptq_4bit_per_column_v2", "gptq:4bit-g-1-asym"),
    ("fp8_channel", "fp8:compressed-tensors"),
    ("fp8_tensor", "fp8:compressed-tensors"),
    ("fbgemm_fp8", "fp8:fbgemm"),
];

/// `--quantize` values applied at load to the bf16 `dense_bf16`, and the spec's name.
const AT_LOAD: &[(QuantizeArg, &str)] = &[
    (QuantizeArg::Fp8, "fp8:at-load"),
    (QuantizeArg::BitsandbytesNf4, "bitsandbytes-nf4"),
    (QuantizeArg::BitsandbytesFp4, "bitsandbytes-fp4"),
    (QuantizeArg::Bitsandbytes, "bitsandbytes"),
];

/// The reference's sequences and logits: `(token ids, [len, vocab] logits)`.
fn expected(model_dir: &std::path::Path) -> Vec<(Vec<u32>, Tensor)> {
    expected_in(&model_dir.join("expected.safetensors"))
}

fn expected_in(file: &std::path::Path) -> Vec<(Vec<u32>, Tensor)> {
    assert!(
        file.is_file(),
        "{} missing: regenerate the fixtures with shard/reference/make_fixtures.py",
        file.display()
    );
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(file, &Device::Cpu)
        .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    (0..)
        .map_while(|i| {
            let ids = tensors.remove(&format!("input_ids.{i}"))?;
            let logits = tensors
                .remove(&format!("logits.{i}"))
                .expect("logits for every input");
            let ids = ids
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|t| t as u32)
                .collect();
            Some((ids, logits))
        })
        .collect()
}

fn load(path: &std::path::Path) -> (Box<dyn Model>, KvCache) {
    load_as(path, DType::F32)
}

fn load_as(path: &std::path::Path, dtype: DType) -> (Box<dyn Model>, KvCache) {
    load_quantized(path, dtype, None)
}

fn load_quantized(
    path: &std::path::Path,
    dtype: DType,
    quantize: Option<QuantizeArg>,
) -> (Box<dyn Model>, KvCache) {
    let files = ModelFiles::open(path).unwrap();
    let comm: Comm = Arc::new(SingleRank);
    let model = load_model_shard(&files, &Device::Cpu, dtype, quantize, &comm)
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()));
    let cache = KvCache::new(model.spec(), NUM_BLOCKS, BLOCK_SIZE, &Device::Cpu).unwrap();
    (model, cache)
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

/// `||a - b|| / ||b||`.
fn relative_rms_error(actual: &Tensor, expected: &Tensor) -> f32 {
    let rms = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    rms(&(actual - expected).unwrap()) / rms(expected)
}

/// A sequence placed in the paged cache on scattered blocks.
struct PagedSequence {
    tokens: Vec<u32>,
    block_table: Vec<u32>,
    slots: Vec<u32>,
    /// Tokens already in the cache.
    cached: usize,
    /// Logits of every position computed so far, `[1, vocab]` each.
    logits: Vec<Tensor>,
}

impl PagedSequence {
    /// Sequence `index` of `count` gets every `count`-th block, backwards, so that
    /// sequences interleave in the cache and blocks are not in slot order. Blocks and
    /// slots cover `capacity` tokens.
    fn new(tokens: Vec<u32>, capacity: usize, index: usize, count: usize) -> Self {
        let blocks = capacity.div_ceil(BLOCK_SIZE);
        let block_table: Vec<u32> = (0..blocks)
            .rev()
            .map(|b| (index + b * count) as u32)
            .collect();
        let slots = (0..capacity)
            .map(|p| block_table[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32)
            .collect();
        Self {
            tokens,
            block_table,
            slots,
            cached: 0,
            logits: vec![],
        }
    }
}

/// Runs one forward pass in which every sequence advances up to `upto(sequence)`
/// tokens (those with nothing new sit out), asking for the logits of every new token.
fn step(
    model: &dyn Model,
    cache: &mut KvCache,
    seqs: &mut [PagedSequence],
    upto: impl Fn(&PagedSequence) -> usize,
) {
    let ends: Vec<usize> = seqs.iter().map(|s| upto(s).min(s.tokens.len())).collect();
    let active: Vec<usize> = (0..seqs.len())
        .filter(|&i| ends[i] > seqs[i].cached)
        .collect();
    if active.is_empty() {
        return;
    }
    let inputs: Vec<SequenceInput> = active
        .iter()
        .map(|&i| SequenceInput {
            new_token_ids: &seqs[i].tokens[seqs[i].cached..ends[i]],
            start_position: seqs[i].cached,
            slots: &seqs[i].slots,
            block_table: &seqs[i].block_table,
        })
        .collect();
    let total: u32 = inputs.iter().map(|s| s.new_token_ids.len() as u32).sum();
    let rows: Vec<u32> = (0..total).collect();
    let batch = ForwardBatch::new(&inputs, &rows, &Device::Cpu).unwrap();
    let logits = model.forward(&batch, cache).unwrap();
    assert_eq!(logits.dims(), &[total as usize, model.spec().vocab_size]);
    let mut row = 0;
    for &i in &active {
        for _ in seqs[i].cached..ends[i] {
            seqs[i].logits.push(logits.narrow(0, row, 1).unwrap());
            row += 1;
        }
        seqs[i].cached = ends[i];
    }
}

fn all_logits(seq: &PagedSequence) -> Tensor {
    Tensor::cat(&seq.logits, 0).unwrap()
}

#[test]
fn tiny_models_match_the_numpy_reference() {
    let dir = fixtures_dir();
    for name in TINY_MODELS {
        let model_dir = dir.join(name);
        let (model, mut cache) = load(&model_dir);
        for (i, (ids, reference)) in expected(&model_dir).into_iter().enumerate() {
            let mut seq = [PagedSequence::new(ids.clone(), ids.len(), 0, 1)];
            step(model.as_ref(), &mut cache, &mut seq, |s| s.tokens.len());
            let err = max_relative_error(&all_logits(&seq[0]), &reference);
            assert!(err < 1e-3, "{name} sequence {i}: relative error {err}");
        }
    }
}

/// Every quantized format on the CPU: the weights dequantized exactly, so the logits are
/// the reference's over the weights the packed tensors stand for.
#[test]
fn quantized_checkpoints_match_the_numpy_reference() {
    let dir = fixtures_dir();
    for (name, format) in QUANTIZED_MODELS {
        let model_dir = dir.join(name);
        let (model, mut cache) = load(&model_dir);
        assert_eq!(model.spec().quantization, *format, "{name}");
        for (i, (ids, reference)) in expected(&model_dir).into_iter().enumerate() {
            let mut seq = [PagedSequence::new(ids.clone(), ids.len(), 0, 1)];
            step(model.as_ref(), &mut cache, &mut seq, |s| s.tokens.len());
            let err = max_relative_error(&all_logits(&seq[0]), &reference);
            assert!(err < 1e-3, "{name} sequence {i}: relative error {err}");
        }
    }
}

/// A bf16 checkpoint quantized at load by each `--quantize` that does so: the
/// reference quantizes it the same way.
#[test]
fn checkpoints_quantized_at_load_match_the_numpy_reference() {
    let model_dir = fixtures_dir().join("dense_bf16");
    for (flag, format) in AT_LOAD {
        let (model, mut cache) = load_quantized(&model_dir, DType::F32, Some(*flag));
        assert_eq!(model.spec().quantization, *format);
        let file = model_dir.join(format!("expected.{flag}.safetensors"));
        for (i, (ids, reference)) in expected_in(&file).into_iter().enumerate() {
            let mut seq = [PagedSequence::new(ids.clone(), ids.len(), 0, 1)];
            step(model.as_ref(), &mut cache, &mut seq, |s| s.tokens.len());
            let err = max_relative_error(&all_logits(&seq[0]), &reference);
            assert!(err < 1e-3, "--quantize {flag} sequence {i}: relative error {err}");
        }
    }
    // Served as stored, the bf16 weights are not the quantized reference's.
    let (model, mut cache) = load(&model_dir);
    let (ids, nf4) = expected_in(&model_dir.join("expected.bitsandbytes-nf4.safetensors")).remove(0);
    let mut seq = [PagedSequence::new(ids.clone(), ids.len(), 0, 1)];
    step(model.as_ref(), &mut cache, &mut seq, |s| s.tokens.len());
    assert!(max_relative_error(&all_logits(&seq[0]), &nf4) > 1e-2);
}

/// bf16 activations and KV cache (as on GPUs): close to the reference, f32 logits out.
#[test]
fn tiny_models_run_in_bf16() {
    let dir = fixtures_dir();
    for name in ["llama3_gqa_tied", "qwen2_bias", "llama3_gguf", "awq_g64", "fp8_channel"] {
        let model_dir = dir.join(name);
        let (model, mut cache) = load_as(&model_dir, DType::BF16);
        for (i, (ids, reference)) in expected(&model_dir).into_iter().enumerate() {
            let mut seq = [PagedSequence::new(ids.clone(), ids.len(), 0, 1)];
            step(model.as_ref(), &mut cache, &mut seq, |s| s.tokens.len());
            let logits = all_logits(&seq[0]);
            assert_eq!(logits.dtype(), DType::F32);
            // bf16 keeps ~3 significant digits: measured ~1% RMS error.
            let err = relative_rms_error(&logits, &reference);
            assert!(err < 0.03, "{name} sequence {i}: relative RMS error {err}");
        }
    }
}

/// Sequences of different lengths batched together, going through a prefill, batched
/// decode steps and chunks continuing their cached prefixes, give each sequence's
/// logits alone (and the reference's).
#[test]
fn ragged_batches_with_cached_prefixes_and_decode_match_single_sequences() {
    let dir = fixtures_dir();
    for name in [
        "llama3_gqa_tied",
        "mistral_window",
        "awq_g64",
        "gptq_4bit_g32_act_order_asym",
    ] {
        let model_dir = dir.join(name);
        let (model, mut cache) = load(&model_dir);
        let expected = expected(&model_dir);
        let count = expected.len();
        let single: Vec<Tensor> = expected
            .iter()
            .map(|(ids, _)| {
                let mut seq = [PagedSequence::new(ids.clone(), ids.len(), 0, 1)];
                step(model.as_ref(), &mut cache, &mut seq, |s| s.tokens.len());
                all_logits(&seq[0])
            })
            .collect();
        let mut seqs: Vec<PagedSequence> = expected
            .iter()
            .enumerate()
            .map(|(i, (ids, _))| PagedSequence::new(ids.clone(), ids.len(), i, count))
            .collect();
        // Lengths 11, 6, 1: prefill (5, 3, -), a decode step over contexts of different
        // lengths (6, 4, 1), chunks continuing cached prefixes (9, 6, -), then decode.
        step(model.as_ref(), &mut cache, &mut seqs, |s| s.tokens.len() / 2);
        step(model.as_ref(), &mut cache, &mut seqs, |s| s.cached + 1);
        step(model.as_ref(), &mut cache, &mut seqs, |s| s.cached + 3);
        while seqs.iter().any(|s| s.cached < s.tokens.len()) {
            step(model.as_ref(), &mut cache, &mut seqs, |s| s.cached + 1);
        }
        for (i, seq) in seqs.iter().enumerate() {
            let batched = all_logits(seq);
            let err = max_relative_error(&batched, &single[i]);
            assert!(
                err < 1e-4,
                "{name} sequence {i}: batched vs alone, relative error {err}"
            );
            let err = max_relative_error(&batched, &expected[i].1);
            assert!(
                err < 1e-3,
                "{name} sequence {i}: batched vs reference, relative error {err}"
            );
        }
    }
}

fn argmax_rows(logits: &Tensor) -> Vec<u32> {
    logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()
}

/// candle's quantized matmul also quantizes the activations (to 8 bits), so the GGUF
/// model is compared loosely with the reference on dequantized weights: same top token
/// at every position and logits within a few percent.
#[test]
fn smollm2_gguf_matches_the_numpy_reference() {
    let (ids, reference) = expected(&fixtures_dir().join("smollm2")).remove(0);
    let path = common::smollm2_gguf();
    let tokenizer = ModelFiles::open(&path).unwrap().tokenizer().unwrap();
    let encoded = tokenizer.encode("The capital of France is", false).unwrap();
    assert_eq!(
        encoded.get_ids(),
        ids.as_slice(),
        "the fixture's prompt ids are not the tokenizer's"
    );
    let (model, mut cache) = load(&path);
    assert_eq!(model.spec().quantization, "gguf:Q4_1");
    let mut seq = [PagedSequence::new(ids.clone(), ids.len(), 0, 1)];
    step(model.as_ref(), &mut cache, &mut seq, |s| s.tokens.len());
    let logits = all_logits(&seq[0]);
    assert_eq!(argmax_rows(&logits), argmax_rows(&reference));
    // Measured: 0.035 for both (the 8-bit activations' noise); a wrong rotation layout
    // or a missing bias lands far above.
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let rms_err = relative_rms_error(&logits, &reference);
    let max_err = max_abs(&(&logits - &reference).unwrap()) / max_abs(&reference);
    assert!(
        rms_err < 0.06 && max_err < 0.08,
        "relative RMS error {rms_err}, relative max error {max_err}"
    );
}

#[test]
fn smollm2_greedy_says_paris() {
    let path = common::smollm2_gguf();
    let tokenizer = ModelFiles::open(&path).unwrap().tokenizer().unwrap();
    let prompt = tokenizer
        .encode("The capital of France is", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let (model, mut cache) = load(&path);
    let new_tokens = 3;
    let mut seq = [PagedSequence::new(
        prompt.clone(),
        prompt.len() + new_tokens,
        0,
        1,
    )];
    for _ in 0..new_tokens {
        step(model.as_ref(), &mut cache, &mut seq, |s| s.tokens.len());
        let next = argmax_rows(seq[0].logits.last().unwrap())[0];
        seq[0].tokens.push(next);
    }
    let text = tokenizer
        .decode(&seq[0].tokens[prompt.len()..], false)
        .unwrap();
    assert!(text.starts_with(" Paris."), "greedy continuation {text:?}");
}
