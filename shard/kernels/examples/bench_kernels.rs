//! Timing of the kernels on Llama-3.1-8B-shaped layers (32 heads, 8 KV heads,
//! head_dim 128, bf16, block size 16, shuffled block tables), next to the two
//! ceilings: a device-to-device copy (memory bandwidth) and the layer's GEMMs at
//! the same token count (what prefill attention should be a fraction of).
//!
//! Times are CUDA-event medians over back-to-back calls (host overhead overlapped,
//! as in a model's forward pass). An argument keeps only the cases whose label
//! contains it.
//!
//! `cargo run --release --features cuda -p text-generation-kernels --example bench_kernels [filter]`
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, DType, Device, Result, Tensor};
use rand::seq::SliceRandom;
use text_generation_kernels::{
    gemv, gemv_silu_mul, greedy, paged_attention_decode, paged_attention_prefill, rope_and_cache,
    sample, silu_mul, SampleRow, SAMPLE_ROW_WORDS,
};

const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const BLOCK_SIZE: usize = 16;
const HIDDEN: usize = 4096;
const INTERMEDIATE: usize = 14336;

/// Median device time of one call of `f`, in microseconds.
fn time_us(dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    const REPS: usize = 10;
    let Device::Cuda(cuda) = dev else {
        bail!("the bench needs a CUDA device")
    };
    let stream = cuda.cuda_stream();
    for _ in 0..3 {
        f()?;
    }
    let mut samples = Vec::new();
    for _ in 0..7 {
        let start = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .w()?;
        for _ in 0..REPS {
            f()?;
        }
        let end = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .w()?;
        samples.push(f64::from(start.elapsed_ms(&end).w()?) * 1e3 / REPS as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// Caches holding `context_lens` tokens in shuffled blocks, and their block tables.
fn paged(context_lens: &[usize], dev: &Device) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let blocks: Vec<usize> = context_lens
        .iter()
        .map(|c| c.div_ceil(BLOCK_SIZE))
        .collect();
    let num_blocks: usize = blocks.iter().sum();
    let max_blocks = *blocks.iter().max().unwrap_or(&1);
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut rand::rng());
    let mut table = vec![0u32; context_lens.len() * max_blocks];
    let mut next = ids.into_iter();
    for (s, &n) in blocks.iter().enumerate() {
        for b in 0..n {
            table[s * max_blocks + b] = next.next().expect("enough blocks");
        }
    }
    let shape = (num_blocks * BLOCK_SIZE, KV_HEADS, HEAD_DIM);
    let k = Tensor::randn(0f32, 1., shape, dev)?.to_dtype(DType::BF16)?;
    let v = Tensor::randn(0f32, 1., shape, dev)?.to_dtype(DType::BF16)?;
    let table = Tensor::from_vec(table, (context_lens.len(), max_blocks), dev)?;
    let lens: Vec<u32> = context_lens.iter().map(|&c| c as u32).collect();
    let lens = Tensor::from_vec(lens, context_lens.len(), dev)?;
    Ok((k, v, table, lens))
}

fn main() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let filter = std::env::args().nth(1).unwrap_or_default();
    let wanted = |label: &str| label.contains(filter.as_str());
    let scale = 1. / (HEAD_DIM as f32).sqrt();
    println!("{:<52} {:>10} {:>12}", "case", "µs", "rate");

    if wanted("copy") {
        let Device::Cuda(cuda) = &dev else {
            unreachable!("created as CUDA")
        };
        let bytes = 1usize << 30;
        let src = cuda.alloc_zeros::<u8>(bytes)?;
        let mut dst = cuda.alloc_zeros::<u8>(bytes)?;
        let us = time_us(&dev, || cuda.memcpy_dtod(&src, &mut dst))?;
        println!(
            "{:<52} {:>10.1} {:>9.0} GB/s",
            "d2d copy 1 GiB (read + write)",
            us,
            2. * bytes as f64 / us / 1e3
        );
    }

    for (seqs, ctx) in [
        (1, 600),
        (64, 600),
        (64, 1024),
        (64, 2048),
        (8, 8192),
        (1, 32768),
        (256, 512),
    ] {
        let label = format!("decode {seqs} seqs x {ctx} ctx");
        if !wanted(&label) {
            continue;
        }
        let context_lens = vec![ctx; seqs];
        let (k, v, table, lens) = paged(&context_lens, &dev)?;
        let q = Tensor::randn(0f32, 1., (seqs, HEADS, HEAD_DIM), &dev)?.to_dtype(DType::BF16)?;
        let us = time_us(&dev, || {
            paged_attention_decode(&q, &k, &v, &table, &lens, BLOCK_SIZE, scale, None).map(drop)
        })?;
        let bytes = (seqs * ctx * KV_HEADS * HEAD_DIM * 2 * 2) as f64;
        println!("{label:<52} {us:>10.1} {:>9.0} GB/s", bytes / us / 1e3);
    }

    // (new tokens, context) per sequence.
    for seqs in [
        vec![(2048usize, 2048usize)],
        vec![(512, 512); 4],
        vec![(2048, 4096)],
        vec![(8192, 8192)],
    ] {
        let label = format!(
            "prefill {} seqs, {} new / {} ctx each",
            seqs.len(),
            seqs[0].0,
            seqs[0].1
        );
        if !wanted(&label) {
            continue;
        }
        let context_lens: Vec<usize> = seqs.iter().map(|s| s.1).collect();
        let (k, v, table, lens) = paged(&context_lens, &dev)?;
        let total: usize = seqs.iter().map(|s| s.0).sum();
        let q = Tensor::randn(0f32, 1., (total, HEADS, HEAD_DIM), &dev)?.to_dtype(DType::BF16)?;
        let mut cu = vec![0u32];
        for s in &seqs {
            cu.push(cu.last().unwrap() + s.0 as u32);
        }
        let cu = Tensor::from_vec(cu, seqs.len() + 1, &dev)?;
        let us = time_us(&dev, || {
            paged_attention_prefill(&q, &k, &v, &cu, &lens, &table, BLOCK_SIZE, scale, None)
                .map(drop)
        })?;
        // QK^T and P.V over the visible (causal) keys only.
        let visible: usize = seqs
            .iter()
            .map(|&(new, ctx)| (ctx - new + 1..=ctx).sum::<usize>())
            .sum();
        let flops = 4. * (HEADS * HEAD_DIM * visible) as f64;
        println!("{label:<52} {us:>10.1} {:>7.0} TFLOP/s", flops / us / 1e6);
        if seqs.len() == 1 && seqs[0] == (2048, 2048) {
            let x = Tensor::randn(0f32, 1., (total, HIDDEN), &dev)?.to_dtype(DType::BF16)?;
            let w = |rows, cols| Tensor::randn(0f32, 1., (rows, cols), &dev)?.to_dtype(DType::BF16);
            let (qkv, o) = (
                w(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM)?,
                w(HIDDEN, HIDDEN)?,
            );
            let (gate_up, down) = (w(HIDDEN, 2 * INTERMEDIATE)?, w(INTERMEDIATE, HIDDEN)?);
            let act =
                Tensor::randn(0f32, 1., (total, INTERMEDIATE), &dev)?.to_dtype(DType::BF16)?;
            let gemm_us = time_us(&dev, || {
                x.matmul(&qkv)?;
                x.matmul(&o)?;
                x.matmul(&gate_up)?;
                act.matmul(&down).map(drop)
            })?;
            let gemm_flops = 2.
                * (total * HIDDEN * ((HEADS + 2 * KV_HEADS) * HEAD_DIM + HIDDEN + 3 * INTERMEDIATE))
                    as f64;
            println!(
                "{:<52} {:>10.1} {:>7.0} TFLOP/s  (attention = {:.0}% of it)",
                "  the layer's GEMMs at 2048 tokens",
                gemm_us,
                gemm_flops / gemm_us / 1e6,
                100. * us / gemm_us
            );
        }
    }

    let tokens = 2048;
    let label = format!("silu_mul {tokens} x {INTERMEDIATE}");
    if wanted(&label) {
        let gate_up =
            Tensor::randn(0f32, 1., (tokens, 2 * INTERMEDIATE), &dev)?.to_dtype(DType::BF16)?;
        let bytes = (tokens * INTERMEDIATE * 3 * 2) as f64;
        let us = time_us(&dev, || silu_mul(&gate_up).map(drop))?;
        println!("{label:<52} {us:>10.1} {:>9.0} GB/s", bytes / us / 1e3);
        let us = time_us(&dev, || {
            let (gate, up) = (
                gate_up.narrow(1, 0, INTERMEDIATE)?,
                gate_up.narrow(1, INTERMEDIATE, INTERMEDIATE)?,
            );
            (gate.silu()? * up).map(drop)
        })?;
        println!("{:<52} {us:>10.1}", "  unfused candle silu(gate) * up");
    }

    // Llama-3.1-8B's decode projections (q/k/v fused, o, gate/up fused, down, lm_head)
    // for 1 and 8 rows; weights cycle through copies worth more than L2 (50 MB).
    for (n, k) in [
        (6144, 4096),
        (4096, 4096),
        (28672, 4096),
        (4096, 14336),
        (128256, 4096),
    ] {
        for m in [1, 8] {
            let label = format!("gemv m={m} {n}x{k}");
            if !wanted(&label) {
                continue;
            }
            let bytes = (n * k * 2) as f64;
            let copies = (200e6 / bytes).ceil() as usize;
            let weights = (0..copies)
                .map(|_| Tensor::randn(0f32, 0.05, (n, k), &dev)?.to_dtype(DType::BF16))
                .collect::<Result<Vec<_>>>()?;
            let x = Tensor::randn(0f32, 1., (m, k), &dev)?.to_dtype(DType::BF16)?;
            let mut i = 0;
            let us = time_us(&dev, || {
                i += 1;
                gemv(&x, &weights[i % copies]).map(drop)
            })?;
            println!("{label:<52} {us:>10.1} {:>9.0} GB/s", bytes / us / 1e3);
            let us = time_us(&dev, || {
                i += 1;
                x.matmul(&weights[i % copies].t()?).map(drop)
            })?;
            println!(
                "{:<52} {us:>10.1} {:>9.0} GB/s",
                "  cuBLAS x.matmul(w.t())",
                bytes / us / 1e3
            );
            if n == 2 * INTERMEDIATE {
                let us = time_us(&dev, || {
                    i += 1;
                    gemv_silu_mul(&x, &weights[i % copies]).map(drop)
                })?;
                println!(
                    "{:<52} {us:>10.1} {:>9.0} GB/s",
                    "  gemv_silu_mul (SwiGLU inside)",
                    bytes / us / 1e3
                );
            }
        }
    }

    // q/k/v rows of one fused projection, rotated and cached.
    for tokens in [1, 64, 2048] {
        let label = format!("rope_and_cache {tokens} tokens");
        if !wanted(&label) {
            continue;
        }
        let (kc, vc, _, _) = paged(&[tokens], &dev)?;
        let (q_width, kv_width) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
        let qkv = Tensor::randn(0f32, 1., (tokens, q_width + 2 * kv_width), &dev)?
            .to_dtype(DType::BF16)?;
        let (q, k, v) = (
            qkv.narrow(1, 0, q_width)?,
            qkv.narrow(1, q_width, kv_width)?,
            qkv.narrow(1, q_width + kv_width, kv_width)?,
        );
        let cos = Tensor::randn(0f32, 1., (tokens, HEAD_DIM / 2), &dev)?.to_dtype(DType::BF16)?;
        let mut slots: Vec<i64> = (0..tokens as i64).collect();
        slots.shuffle(&mut rand::rng());
        let slots = Tensor::from_vec(slots, tokens, &dev)?;
        let us = time_us(&dev, || {
            rope_and_cache(&q, &k, &v, &cos, &cos, false, &kc, &vc, &slots).map(drop)
        })?;
        // Reads q, k, v and writes q, k, v.
        let bytes = (tokens * (q_width + 2 * kv_width) * 2 * 2) as f64;
        println!("{label:<52} {us:>10.1} {:>9.0} GB/s", bytes / us / 1e3);
    }

    // A step's token choice over Llama 3's vocabulary: greedy, then the sampler with the
    // load benchmark's presets (logits of a random 8B model are nearly flat, the
    // sampler's slowest case: every token is kept at temperature 1).
    let vocab = 128_256;
    let presets: [(&str, SampleRow, usize); 5] = [
        ("temperature 1", SampleRow { do_sample: true, ..neutral_row() }, 0),
        ("t 0.7 + top_p 0.9", SampleRow { do_sample: true, temperature: 0.7, top_p: 0.9, ..neutral_row() }, 0),
        ("top_k 50 + rep 1.1 (600 seen)", SampleRow { do_sample: true, top_k: 50, repetition_penalty: 1.1, ..neutral_row() }, 0),
        ("temperature 1 + top-5 logprobs", SampleRow { do_sample: true, top_n: 5, ..neutral_row() }, 5),
        ("min_p 0.05 + typical 0.9", SampleRow { do_sample: true, min_p: 0.05, typical_p: 0.9, ..neutral_row() }, 0),
    ];
    for rows in [1usize, 64, 256] {
        let label = format!("greedy {rows} x {vocab}");
        let logits = Tensor::randn(0f32, 1., (rows, vocab), &dev)?;
        if wanted(&label) {
            let us = time_us(&dev, || greedy(&logits).map(drop))?;
            println!("{label:<52} {us:>10.1}");
        }
        for (name, row, top_n) in &presets {
            let label = format!("sample {rows} x {vocab}: {name}");
            if !wanted(&label) {
                continue;
            }
            let seen = if row.repetition_penalty != 1.0 { 600 } else { 0 };
            let mut words = Vec::new();
            let mut pairs = Vec::new();
            for r in 0..rows as u32 {
                let begin = r * seen;
                pairs.extend((0..seen).flat_map(|t| [t * 97 % vocab as u32, t % 3]));
                let row = SampleRow { seed: r.into(), penalties: begin..begin + seen, ..row.clone() };
                words.extend(row.to_words());
            }
            let params = Tensor::from_vec(words, (rows, SAMPLE_ROW_WORDS), &dev)?;
            let penalties = if seen > 0 {
                Some(Tensor::from_vec(pairs, (rows * seen as usize, 2), &dev)?)
            } else {
                None
            };
            let us = time_us(&dev, || sample(&logits, &params, penalties.as_ref(), *top_n).map(drop))?;
            println!("{label:<52} {us:>10.1}");
        }
    }
    Ok(())
}

/// A row that leaves the distribution as it is.
fn neutral_row() -> SampleRow {
    SampleRow {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        typical_p: 1.0,
        min_p: 0.0,
        do_sample: false,
        seed: 0,
        step: 0,
        repetition_penalty: 1.0,
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
        penalties: 0..0,
        top_n: 0,
    }
}
