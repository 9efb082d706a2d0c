//! The CUDA kernels against straightforward candle references (K/V gathered through
//! the block table, masked softmax in f32) on fresh random inputs: random block
//! tables, ragged lengths (1, non-multiples of the block size, several partitions),
//! GQA ratios 1/3/4/8, sliding windows, bf16 and f16, head_dim 64 and 128.
//! Needs a CUDA GPU: `cargo test --release --features cuda -p text-generation-kernels`.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use rand::seq::SliceRandom;
use rand::Rng;
use text_generation_kernels::{
    gemv, gemv_silu_mul, greedy, paged_attention_decode, paged_attention_prefill, rope_and_cache,
    silu_mul,
};

const BLOCK_SIZE: usize = 16;

fn device() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

/// Relative L2 error in f32; NaN anywhere fails.
fn rel_error(out: &Tensor, reference: &Tensor) -> Result<f32> {
    let out = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let reference = reference
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(out.len(), reference.len());
    assert!(out.iter().all(|v| v.is_finite()), "non-finite output");
    let diff: f32 = out
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b) * (a - b))
        .sum();
    let norm: f32 = reference.iter().map(|b| b * b).sum();
    Ok((diff / norm.max(1e-20)).sqrt())
}

fn tolerance(dtype: DType) -> f32 {
    if dtype == DType::BF16 {
        1.5e-2
    } else {
        3e-3
    }
}

/// A paged cache filled with random rows, and sequences owning random, distinct blocks.
struct Paged {
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    tables: Vec<Vec<u32>>,
}

impl Paged {
    fn new(
        context_lens: &[usize],
        max_blocks: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let mut rng = rand::rng();
        let needed: usize = context_lens.iter().map(|c| c.div_ceil(BLOCK_SIZE)).sum();
        let num_blocks = needed + 7; // spare blocks nobody owns
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        free.shuffle(&mut rng);
        let tables: Vec<Vec<u32>> = context_lens
            .iter()
            .map(|c| {
                let own: Vec<u32> = free.drain(..c.div_ceil(BLOCK_SIZE)).collect();
                // Padding columns point at random blocks: the kernels must not read them.
                (0..max_blocks)
                    .map(|i| {
                        own.get(i)
                            .copied()
                            .unwrap_or(rng.random_range(0..num_blocks as u32))
                    })
                    .collect()
            })
            .collect();
        let flat: Vec<u32> = tables.iter().flatten().copied().collect();
        let shape = (num_blocks * BLOCK_SIZE, kv_heads, head_dim);
        Ok(Self {
            key_cache: Tensor::randn(0f32, 1., shape, dev)?.to_dtype(dtype)?,
            value_cache: Tensor::randn(0f32, 1., shape, dev)?.to_dtype(dtype)?,
            block_tables: Tensor::from_vec(flat, (context_lens.len(), max_blocks), dev)?,
            tables,
        })
    }

    fn slot(&self, seq: usize, pos: usize) -> i64 {
        (self.tables[seq][pos / BLOCK_SIZE] as usize * BLOCK_SIZE + pos % BLOCK_SIZE) as i64
    }

    /// K and V of positions 0..len of a sequence, `[kv_heads, len, head_dim]` in f32.
    fn gather(&self, seq: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let slots: Vec<u32> = (0..len).map(|p| self.slot(seq, p) as u32).collect();
        let idx = Tensor::from_vec(slots, len, self.key_cache.device())?;
        let take = |cache: &Tensor| {
            cache
                .index_select(&idx, 0)?
                .to_dtype(DType::F32)?
                .transpose(0, 1)?
                .contiguous()
        };
        Ok((take(&self.key_cache)?, take(&self.value_cache)?))
    }
}

/// Attention of `q` (`[n, heads, head_dim]`, the last n of `ctx` positions) over
/// the gathered K/V, causal and windowed, in f32. Returns `[n, heads, head_dim]`.
fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    ctx: usize,
    scale: f32,
    window: Option<usize>,
) -> Result<Tensor> {
    let (n, heads, head_dim) = q.dims3()?;
    let kv_heads = k.dim(0)?;
    let group = heads / kv_heads;
    // [heads, n, d] -> [kv_heads, group * n, d]: rows of one KV head's query heads.
    let q = q
        .to_dtype(DType::F32)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((kv_heads, group * n, head_dim))?;
    let scores = (q.matmul(&k.t()?)? * scale as f64)?;
    let mut mask = Vec::with_capacity(group * n * ctx);
    for _ in 0..group {
        for i in 0..n {
            let pos = ctx - n + i;
            mask.extend((0..ctx).map(|j| {
                let visible = j <= pos && window.is_none_or(|w| pos - j < w);
                if visible {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    let mask = Tensor::from_vec(mask, (1, group * n, ctx), q.device())?;
    let scores = scores.broadcast_add(&mask)?;
    let probs = scores
        .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
        .exp()?;
    let probs = probs.broadcast_div(&probs.sum_keepdim(D::Minus1)?)?;
    probs
        .matmul(v)?
        .reshape((heads, n, head_dim))?
        .transpose(0, 1)?
        .contiguous()
}

struct Config {
    dtype: DType,
    head_dim: usize,
    kv_heads: usize,
    group: usize,
    window: Option<usize>,
}

fn configs() -> Vec<Config> {
    let mut all = Vec::new();
    for dtype in [DType::BF16, DType::F16] {
        for head_dim in [64, 128] {
            for (kv_heads, group) in [(2, 1), (3, 3), (2, 4), (1, 8)] {
                for window in [None, Some(37)] {
                    all.push(Config {
                        dtype,
                        head_dim,
                        kv_heads,
                        group,
                        window,
                    });
                }
            }
        }
    }
    all.push(Config {
        dtype: DType::BF16,
        head_dim: 128,
        kv_heads: 2,
        group: 4,
        window: Some(700),
    });
    all
}

/// Writes `[tokens, kv_heads, head_dim]` K/V rows into the caches as the model does
/// (`rope_and_cache`), with an identity rotation so that they arrive unchanged.
fn write_cache(
    key_cache: &Tensor,
    value_cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    slots: &Tensor,
) -> Result<()> {
    let (tokens, kv_heads, head_dim) = k.dims3()?;
    let cos = Tensor::ones((tokens, head_dim / 2), k.dtype(), k.device())?;
    let sin = cos.zeros_like()?;
    let (k, v) = (
        k.reshape((tokens, kv_heads * head_dim))?,
        v.reshape((tokens, kv_heads * head_dim))?,
    );
    rope_and_cache(&k, &k, &v, &cos, &sin, false, key_cache, value_cache, slots).map(drop)
}

/// Rotates `x` `[tokens, heads, head_dim]` in f32 by per-token angles `[tokens, head_dim / 2]`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (tokens, heads, head_dim) = x.dims3()?;
    let half = head_dim / 2;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let pairs = if interleaved {
        x.reshape((tokens, heads, half, 2))?
    } else {
        x.reshape((tokens, heads, 2, half))?.transpose(2, 3)?
    };
    let (a, b) = (pairs.i((.., .., .., 0))?, pairs.i((.., .., .., 1))?);
    let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
    let rb = (b.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
    let rotated = Tensor::stack(&[ra, rb], 3)?; // [tokens, heads, half, 2]
    if interleaved {
        rotated.reshape((tokens, heads, head_dim))
    } else {
        rotated
            .transpose(2, 3)?
            .contiguous()?
            .reshape((tokens, heads, head_dim))
    }
}

#[test]
fn rope_and_cache_rotates_and_writes_rows_by_slot() -> Result<()> {
    let dev = device();
    let mut rng = rand::rng();
    for dtype in [DType::BF16, DType::F16] {
        for interleaved in [false, true] {
            let (tokens, heads, kv_heads, head_dim, num_slots) = (37, 6, 3, 64, 128);
            let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
            // q, k and v as column ranges of one fused projection output.
            let qkv =
                Tensor::randn(0f32, 1., (tokens, q_width + 2 * kv_width), &dev)?.to_dtype(dtype)?;
            let (q, k, v) = (
                qkv.narrow(1, 0, q_width)?,
                qkv.narrow(1, q_width, kv_width)?,
                qkv.narrow(1, q_width + kv_width, kv_width)?,
            );
            let angles = Tensor::rand(0f32, 100., (tokens, head_dim / 2), &dev)?;
            let (cos, sin) = (
                angles.cos()?.to_dtype(dtype)?,
                angles.sin()?.to_dtype(dtype)?,
            );
            let cache =
                || Tensor::randn(0f32, 1., (num_slots, kv_heads, head_dim), &dev)?.to_dtype(dtype);
            let (key_cache, value_cache) = (cache()?, cache()?);
            let mut free: Vec<i64> = (0..num_slots as i64).collect();
            free.shuffle(&mut rng);
            // Every fifth token is padding (slot -1).
            let slots: Vec<i64> = (0..tokens)
                .map(|t| if t % 5 == 4 { -1 } else { free[t] })
                .collect();
            let before = (
                key_cache.to_dtype(DType::F32)?,
                value_cache.to_dtype(DType::F32)?,
            );
            let slots_t = Tensor::from_vec(slots.clone(), tokens, &dev)?;
            let q_rot = rope_and_cache(
                &q,
                &k,
                &v,
                &cos,
                &sin,
                interleaved,
                &key_cache,
                &value_cache,
                &slots_t,
            )?;

            let f32_tables = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
            let as_heads =
                |t: &Tensor, n: usize| t.to_dtype(DType::F32)?.reshape((tokens, n, head_dim));
            let expected_q = rotate(
                &as_heads(&q, heads)?,
                &f32_tables.0,
                &f32_tables.1,
                interleaved,
            )?;
            let err = rel_error(&q_rot, &expected_q)?;
            assert!(
                err < tolerance(dtype),
                "queries {dtype:?} interleaved={interleaved}: {err}"
            );
            let expected_k = rotate(
                &as_heads(&k, kv_heads)?,
                &f32_tables.0,
                &f32_tables.1,
                interleaved,
            )?;
            let (mut keys, mut values) = (before.0.to_vec3::<f32>()?, before.1.to_vec3::<f32>()?);
            let (new_k, new_v) = (
                expected_k.to_vec3::<f32>()?,
                as_heads(&v, kv_heads)?.to_vec3::<f32>()?,
            );
            for (t, &slot) in slots.iter().enumerate() {
                if slot >= 0 {
                    keys[slot as usize] = new_k[t].clone();
                    values[slot as usize] = new_v[t].clone();
                }
            }
            assert_eq!(
                value_cache.to_dtype(DType::F32)?.to_vec3::<f32>()?,
                values,
                "values {dtype:?}"
            );
            let got_keys = key_cache.to_dtype(DType::F32)?;
            let err = rel_error(&got_keys, &Tensor::new(keys.clone(), &dev)?)?;
            assert!(
                err < tolerance(dtype),
                "keys {dtype:?} interleaved={interleaved}: {err}"
            );
            // Slots no token owns keep their rows exactly.
            let got_keys = got_keys.to_vec3::<f32>()?;
            for slot in (0..num_slots).filter(|&s| !slots.contains(&(s as i64))) {
                assert_eq!(got_keys[slot], keys[slot], "untouched slot {slot}");
            }
        }
    }
    Ok(())
}

#[test]
fn decode_matches_reference() -> Result<()> {
    let dev = device();
    // 1 token, a block boundary, a partial block, and several 512-token partitions.
    let context_lens = [1usize, 16, 17, 300, 1100, 2049];
    let max_blocks = 2049usize.div_ceil(BLOCK_SIZE) + 3;
    for c in configs() {
        let heads = c.kv_heads * c.group;
        let paged = Paged::new(
            &context_lens,
            max_blocks,
            c.kv_heads,
            c.head_dim,
            c.dtype,
            &dev,
        )?;
        let q = Tensor::randn(0f32, 1., (context_lens.len(), heads, c.head_dim), &dev)?
            .to_dtype(c.dtype)?;
        let lens: Vec<u32> = context_lens.iter().map(|&l| l as u32).collect();
        let lens = Tensor::from_vec(lens, context_lens.len(), &dev)?;
        let scale = 1. / (c.head_dim as f32).sqrt();
        let out = paged_attention_decode(
            &q,
            &paged.key_cache,
            &paged.value_cache,
            &paged.block_tables,
            &lens,
            BLOCK_SIZE,
            scale,
            c.window,
        )?;
        assert_eq!(out.dims(), q.dims());
        for (s, &ctx) in context_lens.iter().enumerate() {
            let (k, v) = paged.gather(s, ctx)?;
            let expected = reference(&q.i(s..s + 1)?, &k, &v, ctx, scale, c.window)?;
            let err = rel_error(&out.i(s..s + 1)?, &expected)?;
            assert!(
                err < tolerance(c.dtype),
                "decode {:?} d{} kv{} g{} window {:?} ctx {ctx}: rel error {err}",
                c.dtype,
                c.head_dim,
                c.kv_heads,
                c.group,
                c.window
            );
        }
    }
    Ok(())
}

#[test]
fn prefill_matches_reference() -> Result<()> {
    let dev = device();
    // (new tokens, context): single tokens, partial tiles, tiles spanning blocks,
    // cached prefixes (new < context), and a multi-tile sequence.
    let seqs = [
        (1usize, 1usize),
        (5, 5),
        (1, 40),
        (70, 70),
        (33, 130),
        (64, 64),
        (200, 517),
    ];
    let max_blocks = 517usize.div_ceil(BLOCK_SIZE) + 2;
    let mut rng = rand::rng();
    for c in configs() {
        let heads = c.kv_heads * c.group;
        let context_lens: Vec<usize> = seqs.iter().map(|s| s.1).collect();
        let paged = Paged::new(
            &context_lens,
            max_blocks,
            c.kv_heads,
            c.head_dim,
            c.dtype,
            &dev,
        )?;
        let total: usize = seqs.iter().map(|s| s.0).sum();
        // The new tokens' K/V go through the model's cache write.
        let new_k =
            Tensor::randn(0f32, 1., (total, c.kv_heads, c.head_dim), &dev)?.to_dtype(c.dtype)?;
        let new_v =
            Tensor::randn(0f32, 1., (total, c.kv_heads, c.head_dim), &dev)?.to_dtype(c.dtype)?;
        let slots: Vec<i64> = seqs
            .iter()
            .enumerate()
            .flat_map(|(s, &(new, ctx))| (ctx - new..ctx).map(move |p| (s, p)))
            .map(|(s, p)| paged.slot(s, p))
            .collect();
        write_cache(
            &paged.key_cache,
            &paged.value_cache,
            &new_k,
            &new_v,
            &Tensor::from_vec(slots, total, &dev)?,
        )?;

        let q = (Tensor::randn(0f32, 1., (total, heads, c.head_dim), &dev)?
            * rng.random_range(0.5..2.0))?
        .to_dtype(c.dtype)?;
        let mut cu = vec![0u32];
        for &(new, _) in &seqs {
            cu.push(cu.last().unwrap() + new as u32);
        }
        let cu_t = Tensor::from_vec(cu.clone(), seqs.len() + 1, &dev)?;
        let lens: Vec<u32> = context_lens.iter().map(|&l| l as u32).collect();
        let lens = Tensor::from_vec(lens, seqs.len(), &dev)?;
        let scale = 1. / (c.head_dim as f32).sqrt();
        let out = paged_attention_prefill(
            &q,
            &paged.key_cache,
            &paged.value_cache,
            &cu_t,
            &lens,
            &paged.block_tables,
            BLOCK_SIZE,
            scale,
            c.window,
        )?;
        assert_eq!(out.dims(), q.dims());
        for (s, &(new, ctx)) in seqs.iter().enumerate() {
            let rows = cu[s] as usize..cu[s + 1] as usize;
            let (k, v) = paged.gather(s, ctx)?;
            let expected = reference(&q.i(rows.clone())?, &k, &v, ctx, scale, c.window)?;
            let err = rel_error(&out.i(rows)?, &expected)?;
            assert!(
                err < tolerance(c.dtype),
                "prefill {:?} d{} kv{} g{} window {:?} new {new} ctx {ctx}: rel error {err}",
                c.dtype,
                c.head_dim,
                c.kv_heads,
                c.group,
                c.window
            );
        }
    }
    Ok(())
}

#[test]
fn decode_of_a_single_new_token_equals_prefill() -> Result<()> {
    let dev = device();
    let (kv_heads, heads, head_dim) = (2, 8, 128);
    let context_lens = [9usize, 600];
    let paged = Paged::new(&context_lens, 40, kv_heads, head_dim, DType::BF16, &dev)?;
    let q = Tensor::randn(0f32, 1., (2, heads, head_dim), &dev)?.to_dtype(DType::BF16)?;
    let lens = Tensor::from_vec(vec![9u32, 600], 2, &dev)?;
    let cu = Tensor::from_vec(vec![0u32, 1, 2], 3, &dev)?;
    let decode = paged_attention_decode(
        &q,
        &paged.key_cache,
        &paged.value_cache,
        &paged.block_tables,
        &lens,
        BLOCK_SIZE,
        0.1,
        None,
    )?;
    let prefill = paged_attention_prefill(
        &q,
        &paged.key_cache,
        &paged.value_cache,
        &cu,
        &lens,
        &paged.block_tables,
        BLOCK_SIZE,
        0.1,
        None,
    )?;
    let err = rel_error(&decode, &prefill)?;
    assert!(err < tolerance(DType::BF16), "rel error {err}");
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let dev = device();
    let paged = Paged::new(&[20], 4, 2, 64, DType::BF16, &dev)?;
    let lens = Tensor::from_vec(vec![20u32], 1, &dev)?;
    let call = |q: &Tensor, window| {
        paged_attention_decode(
            q,
            &paged.key_cache,
            &paged.value_cache,
            &paged.block_tables,
            &lens,
            BLOCK_SIZE,
            0.1,
            window,
        )
    };
    let q = Tensor::randn(0f32, 1., (1, 4, 64), &dev)?;
    assert!(call(&q, None).is_err(), "f32 q");
    let q = q.to_dtype(DType::BF16)?;
    assert!(call(&q, Some(0)).is_err(), "empty window");
    let odd_block = paged_attention_decode(
        &q,
        &paged.key_cache,
        &paged.value_cache,
        &paged.block_tables,
        &lens,
        12,
        0.1,
        None,
    );
    assert!(odd_block.is_err(), "block size 12");
    assert!(
        call(&q.i((.., ..3, ..))?.contiguous()?, None).is_err(),
        "3 heads over 2 KV heads"
    );
    assert!(
        call(&Tensor::zeros((1, 4, 96), DType::BF16, &dev)?, None).is_err(),
        "head_dim 96"
    );
    assert!(
        call(&q.to_device(&Device::Cpu)?, None).is_err(),
        "q on the CPU"
    );
    assert!(call(&q.transpose(0, 1)?, None).is_err(), "q shape mismatch");
    let wrong_slots = Tensor::from_vec(vec![0i64; 3], 3, &dev)?;
    let kv = Tensor::zeros((2, 2, 64), DType::BF16, &dev)?;
    assert!(
        write_cache(&paged.key_cache, &paged.value_cache, &kv, &kv, &wrong_slots).is_err(),
        "3 slots for 2 tokens"
    );
    Ok(())
}

#[test]
fn silu_mul_matches_reference() -> Result<()> {
    let dev = device();
    for dtype in [DType::BF16, DType::F16] {
        for shape in [(3usize, 5usize, 2 * 40usize), (7, 1, 2 * 2048)] {
            let gate_up = (Tensor::randn(0f32, 1., shape, &dev)? * 3.)?.to_dtype(dtype)?;
            let out = silu_mul(&gate_up)?;
            let half = shape.2 / 2;
            assert_eq!(out.dims(), &[shape.0, shape.1, half]);
            let x = gate_up.to_dtype(DType::F32)?;
            let (gate, up) = (x.narrow(2, 0, half)?, x.narrow(2, half, half)?);
            let expected = ((&gate / (gate.neg()?.exp()? + 1.)?)? * up)?;
            let err = rel_error(&out, &expected)?;
            assert!(
                err < tolerance(dtype),
                "silu_mul {dtype:?} {shape:?}: rel error {err}"
            );
        }
    }
    assert!(
        silu_mul(&Tensor::zeros((2, 12), DType::BF16, &dev)?).is_err(),
        "I = 6 is not a multiple of 8"
    );
    Ok(())
}

#[test]
fn gemv_matches_an_f32_matmul() -> Result<()> {
    let dev = device();
    for dtype in [DType::BF16, DType::F16] {
        // Odd widths: rows not a multiple of the CTA's 8, k not of the unrolled stride.
        for (m, n, k) in [
            (1, 4096, 4096),
            (3, 77, 264),
            (8, 1030, 14336),
            (5, 9, 8),
            (1, 9001, 64),
        ] {
            let x = Tensor::randn(0f32, 1., (m, k), &dev)?.to_dtype(dtype)?;
            let w = (Tensor::randn(0f32, 1., (n + 16, k), &dev)? * 0.05)?.to_dtype(dtype)?;
            // A row view of a larger weight, as a fused q/k/v projection's parts are.
            let w = w.narrow(0, 8, n)?;
            let out = gemv(&x, &w)?;
            assert_eq!(out.dims(), &[m, n]);
            let expected = x
                .to_dtype(DType::F32)?
                .matmul(&w.to_dtype(DType::F32)?.t()?)?;
            let err = rel_error(&out, &expected)?;
            assert!(
                err < tolerance(dtype),
                "gemv {dtype:?} m={m} n={n} k={k}: rel error {err}"
            );

            // The same rows as gate and up of a fused projection [gate; up].
            let up = (Tensor::randn(0f32, 1., (n, k), &dev)? * 0.05)?.to_dtype(dtype)?;
            let gate_up = Tensor::cat(&[&w, &up], 0)?;
            let out = gemv_silu_mul(&x, &gate_up)?;
            assert_eq!(out.dims(), &[m, n]);
            let product = |w: &Tensor| {
                x.to_dtype(DType::F32)?
                    .matmul(&w.to_dtype(DType::F32)?.t()?)?
                    .to_dtype(dtype)?
                    .to_dtype(DType::F32)
            };
            let (gate, up) = (product(&w)?, product(&up)?);
            let expected = ((&gate / (gate.neg()?.exp()? + 1.)?)? * up)?;
            let err = rel_error(&out, &expected)?;
            assert!(
                err < tolerance(dtype),
                "gemv_silu_mul {dtype:?} m={m} n={n} k={k}: rel error {err}"
            );
        }
    }
    let odd = Tensor::zeros((3, 64), DType::BF16, &dev)?;
    assert!(
        gemv_silu_mul(&Tensor::zeros((1, 64), DType::BF16, &dev)?, &odd).is_err(),
        "3 rows of w"
    );
    let x = Tensor::zeros((9, 64), DType::BF16, &dev)?;
    assert!(
        gemv(&x, &Tensor::zeros((4, 64), DType::BF16, &dev)?).is_err(),
        "9 rows"
    );
    let x = Tensor::zeros((1, 12), DType::BF16, &dev)?;
    assert!(
        gemv(&x, &Tensor::zeros((4, 12), DType::BF16, &dev)?).is_err(),
        "k = 12"
    );
    Ok(())
}

#[test]
fn add_rms_norm_matches_an_f32_reference() -> Result<()> {
    let dev = device();
    for dtype in [DType::BF16, DType::F16] {
        for (rows, width) in [(1, 4096), (5, 576), (3, 8)] {
            let x = Tensor::randn(0f32, 1., (rows, width), &dev)?.to_dtype(dtype)?;
            let h = Tensor::randn(0f32, 1., (rows, width), &dev)?.to_dtype(dtype)?;
            let weight = Tensor::randn(1f32, 0.1, width, &dev)?.to_dtype(dtype)?;
            let (sum, normed) = text_generation_kernels::add_rms_norm(&x, &h, &weight, 1e-5)?;
            let expected_sum = (&x + &h)?;
            assert_eq!(
                rel_error(&sum, &expected_sum)?,
                0.0,
                "the sum is exact in {dtype:?}"
            );
            let s = expected_sum.to_dtype(DType::F32)?;
            let inv_rms = (s.sqr()?.mean_keepdim(1)? + 1e-5)?.sqrt()?.recip()?;
            let expected = s
                .broadcast_mul(&inv_rms)?
                .broadcast_mul(&weight.to_dtype(DType::F32)?)?;
            let err = rel_error(&normed, &expected)?;
            assert!(
                err < tolerance(dtype),
                "add_rms_norm {dtype:?} {rows}x{width}: rel error {err}"
            );
        }
    }
    Ok(())
}

#[test]
fn greedy_matches_argmax_and_log_softmax() -> Result<()> {
    let dev = device();
    for (rows, vocab) in [(1usize, 128_256usize), (5, 1000), (3, 7)] {
        let mut logits = (Tensor::randn(0f32, 1., (rows, vocab), &dev)? * 4.)?.to_vec2::<f32>()?;
        // Row 0: a tie between two maxima (the lower index wins) and masked entries.
        let top = logits[0].iter().copied().fold(f32::MIN, f32::max) + 1.;
        logits[0][vocab / 2] = top;
        logits[0][vocab - 1] = top;
        logits[0][0] = f32::NEG_INFINITY;
        let logits = Tensor::new(logits, &dev)?;
        let out = greedy(&logits)?.to_vec2::<f32>()?;
        let cpu = logits.to_device(&Device::Cpu)?;
        let ids = cpu.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let shifted = cpu.broadcast_sub(&cpu.max_keepdim(D::Minus1)?)?;
        let log_softmax = shifted
            .broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?
            .to_vec2::<f32>()?;
        assert_eq!(out[0][0] as usize, vocab / 2, "ties go to the lower index");
        for row in 0..rows {
            assert_eq!(
                out[row][0] as u32, ids[row],
                "row {row} of [{rows}, {vocab}]"
            );
            let expected = log_softmax[row][ids[row] as usize];
            assert!(
                (out[row][1] - expected).abs() < 1e-4 * expected.abs().max(1.),
                "row {row}: logprob {} against {expected}",
                out[row][1]
            );
        }
    }
    let masked = Tensor::full(f32::NEG_INFINITY, (1, 10), &dev)?;
    let out = greedy(&masked)?.to_vec2::<f32>()?;
    assert!(out[0][0] == 0. && out[0][1].is_nan(), "{out:?}");
    assert!(
        greedy(&Tensor::zeros((2, 8), DType::BF16, &dev)?).is_err(),
        "bf16 logits"
    );
    Ok(())
}
