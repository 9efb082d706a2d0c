//! Host side of the kernels in `src/cu`: shape/dtype validation, then launches
//! through candle's custom-op traits so that the outputs are ordinary tensors and
//! the in-place cache writes get candle's mutable storage access.

use std::ops::Deref;
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{self, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchConfig, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor,
};

const ROTARY_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rotary.ptx"));
const DECODE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
const PREFILL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/prefill.ptx"));
const ACTIVATION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/activation.ptx"));
const GEMV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx"));
const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
const SAMPLING_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));

/// The most context tokens per decode CTA (`PARTITION` in decode.cu), and the least
/// the host splits a context into (one pass of a CTA's loads).
const DECODE_MAX_PARTITION: usize = 512;
const DECODE_MIN_PARTITION: usize = 32;
/// Decode CTAs that keep an H100 busy (two per SM), with contexts of ~512 tokens.
const DECODE_TARGET_CTAS: usize = 264;
const DECODE_TYPICAL_CONTEXT: usize = 512;
const DECODE_MAX_PARTS: usize = 64;
const DECODE_THREADS: u32 = 128;
/// Query rows per prefill CTA, keys per K/V tile, and K/V tiles in flight
/// (`BM`, `BN` and `STAGES` in prefill.cu).
const PREFILL_BLOCK_M: usize = 64;
const PREFILL_BLOCK_N: usize = 64;
const PREFILL_STAGES: usize = 2;
const PREFILL_THREADS: u32 = 128;
const HEAD_DIMS: [usize; 2] = [64, 128];
/// Threads of a GEMV CTA, which computes one output feature (`GEMV_WARPS` in gemv.cu).
const GEMV_THREADS: u32 = 8 * 32;
/// Threads of a rotary CTA (`ROTARY_THREADS` in rotary.cu).
const ROTARY_THREADS: usize = 128;
/// The most activation rows [`gemv`] takes (gemv.cu instantiates 1 to 8).
pub const GEMV_MAX_ROWS: usize = 8;
/// Query heads per decode CTA that have kernels (decode.cu instantiates these).
const DECODE_HEADS_PER_CTA: [usize; 5] = [8, 4, 3, 2, 1];

/// The rotary embedding of a step's queries and keys, and its keys and values written
/// into the paged cache, in one kernel: `q` `[tokens, heads * head_dim]`, `k` and `v`
/// `[tokens, kv_heads * head_dim]` (rows may be strided views, e.g. of one fused q/k/v
/// product), `cos`/`sin` `[tokens, head_dim / 2]` (each token's position), rotating the
/// pairs `(i, i + head_dim / 2)` or, `interleaved`, `(2i, 2i + 1)`. The rotated keys and
/// the values go to `key_cache`/`value_cache` (`[num_slots, kv_heads, head_dim]`) at
/// `slots` (`[tokens]`, i64; a negative slot marks a padding token and is skipped, as
/// is a slot past the cache); returns the rotated queries, `[tokens, heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn rope_and_cache(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slots: &Tensor,
) -> Result<Tensor> {
    let (_, kv_heads, head_dim) = key_cache.dims3()?;
    expect_shape("value_cache", value_cache, key_cache.dims())?;
    let (tokens, q_width) = q.dims2()?;
    let kv_width = kv_heads * head_dim;
    expect_shape("k", k, &[tokens, kv_width])?;
    expect_shape("v", v, &[tokens, kv_width])?;
    // The kernel moves 16-byte vectors of 8 pairs.
    if head_dim % 16 != 0 || q_width % head_dim != 0 || kv_heads == 0 {
        bail!("rope_and_cache: q width {q_width} is not whole heads of the cache's head_dim {head_dim} (a multiple of 16)");
    }
    expect_shape("cos", cos, &[tokens, head_dim / 2])?;
    expect_shape("sin", sin, &[tokens, head_dim / 2])?;
    expect_shape("slots", slots, &[tokens])?;
    expect_dtype("slots", slots, DType::I64)?;
    let dtype = half_dtype("q", q)?;
    for (name, t) in [
        ("k", k),
        ("v", v),
        ("cos", cos),
        ("sin", sin),
        ("key_cache", key_cache),
        ("value_cache", value_cache),
    ] {
        expect_dtype(name, t, dtype)?;
    }
    for (name, t) in [
        ("q", q),
        ("k", k),
        ("v", v),
        ("cos", cos),
        ("sin", sin),
        ("key_cache", key_cache),
        ("value_cache", value_cache),
        ("slots", slots),
    ] {
        expect_cuda(name, t)?;
    }
    let heads = q_width / head_dim;
    if tokens == 0 {
        return Tensor::zeros((0, heads, head_dim), dtype, q.device());
    }
    q.apply_op1_no_bwd(&OnCuda(RopeAndCache {
        k,
        v,
        cos,
        sin,
        interleaved,
        key_cache,
        value_cache,
        slots,
        heads,
        kv_heads,
        head_dim,
    }))
}

struct RopeAndCache<'a> {
    k: &'a Tensor,
    v: &'a Tensor,
    cos: &'a Tensor,
    sin: &'a Tensor,
    interleaved: bool,
    key_cache: &'a Tensor,
    value_cache: &'a Tensor,
    slots: &'a Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl CudaOp1 for RopeAndCache<'_> {
    const NAME: &'static str = "rope_and_cache";

    fn cuda(&self, q: &CudaStorage, q_l: &Layout) -> Result<(CudaStorage, Shape)> {
        match q.dtype() {
            DType::BF16 => self.launch::<half::bf16>(q, q_l, "bf16"),
            _ => self.launch::<half::f16>(q, q_l, "f16"),
        }
    }
}

impl RopeAndCache<'_> {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        name: &str,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device();
        let tokens = q_l.dims()[0];
        let (q, q_stride) = rows_view::<T>(q, q_l, "q")?;
        let (k, v) = (bound(self.k, "k"), bound(self.v, "v"));
        let ((k, k_stride), (v, v_stride)) = (k.rows_view::<T>()?, v.rows_view::<T>()?);
        let (cos, sin) = (bound(self.cos, "cos"), bound(self.sin, "sin"));
        let (kc, vc) = (
            bound(self.key_cache, "key_cache"),
            bound(self.value_cache, "value_cache"),
        );
        let slots = bound(self.slots, "slots");
        let (cos, sin, kc, vc, slots) = (
            cos.view::<T>()?,
            sin.view::<T>()?,
            kc.view::<T>()?,
            vc.view::<T>()?,
            slots.view::<i64>()?,
        );
        let num_slots = self.key_cache.dim(0)? as i64;
        // SAFETY: the kernel writes every element of the rotated queries.
        let out = unsafe { dev.alloc::<T>(tokens * self.heads * self.head_dim)? };
        let layout = if self.interleaved {
            "interleaved"
        } else {
            "half_split"
        };
        let func = dev.get_or_load_custom_func(
            &format!("rope_and_cache_{layout}_{name}"),
            "text_generation_rotary",
            ROTARY_PTX,
        )?;
        // Units of 16-byte vectors (rotary.cu): 8 pairs of a query or key head, or 8
        // value elements.
        let units_per_token =
            (self.heads + self.kv_heads) * self.head_dim / 16 + self.kv_heads * self.head_dim / 8;
        let cfg = grid_1d(
            (tokens * units_per_token)
                .div_ceil(ROTARY_THREADS)
                .min(1 << 20) as u32,
            ROTARY_THREADS as u32,
        );
        let stream = dev.cuda_stream();
        let mut launch = Launch::new(&stream);
        launch.buf(&out).buf(&kc).buf(&vc).buf(&q).buf(&k).buf(&v);
        launch.long(q_stride).long(k_stride).long(v_stride);
        launch.buf(&cos).buf(&sin).buf(&slots).long(tokens as i64);
        launch
            .int(self.heads as i32)
            .int(self.kv_heads as i32)
            .int(self.head_dim as i32)
            .long(num_slots);
        // SAFETY: shapes validated in `rope_and_cache`, strides by `rows_view`; slots
        // outside the cache are skipped by the kernel.
        unsafe { launch.run(&func, cfg) }?;
        Ok((
            T::wrap_cuda_slice(out, dev.clone()),
            Shape::from((tokens, self.heads, self.head_dim)),
        ))
    }
}

/// SwiGLU of a fused gate/up projection: `gate_up` is `[..., 2 * I]` with each row
/// `[gate | up]`; returns `silu(gate) * up`, `[..., I]`, in one pass. I must be a
/// multiple of 8.
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    let dims = gate_up.dims();
    let Some((&width, outer)) = dims.split_last() else {
        bail!("silu_mul needs at least one dimension")
    };
    if width % 16 != 0 {
        bail!("silu_mul: the last dimension ({width}) must be 2 * I with I a multiple of 8");
    }
    half_dtype("gate_up", gate_up)?;
    expect_cuda("gate_up", gate_up)?;
    let rows: usize = outer.iter().product();
    if rows == 0 {
        return gate_up.narrow(dims.len() - 1, 0, width / 2)?.zeros_like();
    }
    gate_up.apply_op1_no_bwd(&OnCuda(SiluMul))
}

struct SiluMul;

impl CudaOp1 for SiluMul {
    const NAME: &'static str = "silu_mul";

    fn cuda(&self, input: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        fn launch<T: CudaDType + DeviceRepr>(
            input: &CudaStorage,
            layout: &Layout,
            name: &str,
        ) -> Result<(CudaStorage, Shape)> {
            const THREADS: usize = 256;
            let dev = input.device();
            let view = view::<T>(input, layout, "gate_up")?;
            let mut dims = layout.dims().to_vec();
            let half = dims[dims.len() - 1] / 2;
            let rows = view.len() / (2 * half);
            *dims.last_mut().expect("silu_mul checked the rank") = half;
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<T>(rows * half)? };
            let func = dev.get_or_load_custom_func(
                &format!("silu_mul_{name}"),
                "text_generation_activation",
                ACTIVATION_PTX,
            )?;
            let vecs = rows * half / 8;
            let cfg = grid_1d(vecs.div_ceil(THREADS).min(1 << 16) as u32, THREADS as u32);
            let stream = dev.cuda_stream();
            let mut launch = Launch::new(&stream);
            launch
                .buf(&out)
                .buf(&view)
                .long(rows as i64)
                .int(as_i32(half / 8, "I / 8")?);
            // SAFETY: `out` holds rows * I elements, `view` rows * 2I (checked shapes).
            unsafe { launch.run(&func, cfg) }?;
            Ok((T::wrap_cuda_slice(out, dev.clone()), Shape::from(dims)))
        }
        match input.dtype() {
            DType::BF16 => launch::<half::bf16>(input, layout, "bf16"),
            DType::F16 => launch::<half::f16>(input, layout, "f16"),
            other => bail!("silu_mul: unsupported dtype {other:?}"),
        }
    }
}

/// The residual add and RMSNorm of a Llama block in one pass: for `x` and `h`
/// `[rows, H]` and `weight` `[H]` (contiguous bf16/f16, H a multiple of 8), returns
/// `(x + h, rms_norm(x + h) * weight)`, two views of one `[2, rows, H]` buffer.
pub fn add_rms_norm(x: &Tensor, h: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let (rows, width) = x.dims2()?;
    expect_shape("h", h, &[rows, width])?;
    expect_shape("weight", weight, &[width])?;
    if width % 8 != 0 || width == 0 {
        bail!("add_rms_norm: the width ({width}) must be a positive multiple of 8");
    }
    let dtype = half_dtype("x", x)?;
    for (name, t) in [("x", x), ("h", h), ("weight", weight)] {
        expect_dtype(name, t, dtype)?;
        expect_cuda(name, t)?;
    }
    if rows == 0 {
        return Ok((x.clone(), x.clone()));
    }
    let both = x.apply_op3_no_bwd(h, weight, &AddRmsNorm { eps })?;
    Ok((both.get(0)?, both.get(1)?))
}

struct AddRmsNorm {
    eps: f32,
}

impl candle_core::CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("add_rms_norm runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        h: &CudaStorage,
        h_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let args = [(x, x_l), (h, h_l), (w, w_l)];
        match x.dtype() {
            DType::BF16 => self.launch::<half::bf16>("bf16", args),
            DType::F16 => self.launch::<half::f16>("f16", args),
            other => bail!("add_rms_norm: unsupported dtype {other:?}"),
        }
    }
}

impl AddRmsNorm {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        name: &str,
        [(x, x_l), (h, h_l), (w, w_l)]: [(&CudaStorage, &Layout); 3],
    ) -> Result<(CudaStorage, Shape)> {
        const THREADS: u32 = 256; // NORM_THREADS in norm.cu
        let dev = x.device();
        let (rows, width) = x_l.shape().dims2()?;
        let (x, h, w) = (
            view::<T>(x, x_l, "x")?,
            view::<T>(h, h_l, "h")?,
            view::<T>(w, w_l, "weight")?,
        );
        // SAFETY: the kernel writes every element of both halves.
        let out = unsafe { dev.alloc::<T>(2 * rows * width)? };
        let func = dev.get_or_load_custom_func(
            &format!("add_rms_norm_{name}"),
            "text_generation_norm",
            NORM_PTX,
        )?;
        let cfg = grid_1d(as_i32(rows, "rows")? as u32, THREADS);
        let stream = dev.cuda_stream();
        let mut launch = Launch::new(&stream);
        launch.buf(&out).buf(&x).buf(&h).buf(&w);
        launch
            .long(rows as i64)
            .int(as_i32(width / 8, "H / 8")?)
            .float(self.eps);
        // SAFETY: shapes checked in `add_rms_norm`, contiguity and alignment by `view`.
        unsafe { launch.run(&func, cfg) }?;
        Ok((
            T::wrap_cuda_slice(out, dev.clone()),
            Shape::from((2, rows, width)),
        ))
    }
}

/// `x @ w.t()` for a few rows: `x` `[m, k]` with 1 <= m <= [`GEMV_MAX_ROWS`], `w`
/// `[n, k]` (a linear layer's weight; row views of a larger one are fine), both
/// contiguous bf16 or f16 with k a multiple of 8; returns `[m, n]`, accumulated in f32.
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    check_gemv(x, w)?;
    x.apply_op2_no_bwd(w, &Gemv { gated: false })
}

/// SwiGLU of a fused gate/up projection, computed with it: for `w` `[2 * n, k]` whose
/// rows are `[gate | up]`, returns `silu(x @ gate.t()) * (x @ up.t())`, `[m, n]`.
/// Shapes and types as in [`gemv`].
pub fn gemv_silu_mul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    check_gemv(x, w)?;
    if w.dim(0)? % 2 != 0 {
        bail!(
            "gemv_silu_mul: w has {} rows, not gate and up rows in equal numbers",
            w.dim(0)?
        );
    }
    x.apply_op2_no_bwd(w, &Gemv { gated: true })
}

fn check_gemv(x: &Tensor, w: &Tensor) -> Result<()> {
    let (m, k) = x.dims2()?;
    let (_, w_k) = w.dims2()?;
    if w_k != k {
        bail!("gemv: x has {k} columns, w {w_k}");
    }
    if !(1..=GEMV_MAX_ROWS).contains(&m) {
        bail!("gemv takes 1 to {GEMV_MAX_ROWS} rows of x, got {m}");
    }
    if k % 8 != 0 || k == 0 {
        bail!("gemv: k ({k}) must be a positive multiple of 8");
    }
    let dtype = half_dtype("x", x)?;
    expect_dtype("w", w, dtype)?;
    expect_cuda("x", x)?;
    expect_cuda("w", w)
}

struct Gemv {
    /// Pairs of rows (gate, up) give one output each (see [`gemv_silu_mul`]).
    gated: bool,
}

impl candle_core::CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "gemv"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("gemv runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::BF16 => self.launch::<half::bf16>(x, x_l, w, w_l, "bf16"),
            DType::F16 => self.launch::<half::f16>(x, x_l, w, w_l, "f16"),
            other => bail!("gemv: unsupported dtype {other:?}"),
        }
    }
}

impl Gemv {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
        name: &str,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let (m, k) = x_l.shape().dims2()?;
        let n = w_l.shape().dims()[0] / if self.gated { 2 } else { 1 };
        let (x, w) = (view::<T>(x, x_l, "x")?, view::<T>(w, w_l, "w")?);
        // SAFETY: the kernel writes every output element.
        let y = unsafe { dev.alloc::<T>(m * n)? };
        let variant = if self.gated { "gemv_silu_mul" } else { "gemv" };
        let func = dev.get_or_load_custom_func(
            &format!("{variant}_{name}_m{m}"),
            "text_generation_gemv",
            GEMV_PTX,
        )?;
        let cfg = grid_1d(as_i32(n, "n")? as u32, GEMV_THREADS);
        let stream = dev.cuda_stream();
        let mut launch = Launch::new(&stream);
        launch.buf(&y).buf(&x).buf(&w);
        launch.int(as_i32(n, "n")?).int(as_i32(k / 8, "k / 8")?);
        // SAFETY: shapes checked in `check_gemv`; `view` checked contiguity and alignment.
        unsafe { launch.run(&func, cfg) }?;
        Ok((T::wrap_cuda_slice(y, dev.clone()), Shape::from((m, n))))
    }
}

/// Greedy decoding of every row of `logits` (`[rows, vocab]`, contiguous f32): its
/// argmax (the lowest index among equal maxima) and that token's log-probability, as
/// `[rows, 2]` f32 (ids below 2^24 are exact). Non-finite entries other than +inf are
/// skipped; a row without any other gets token 0 and a NaN log-probability.
pub fn greedy(logits: &Tensor) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    expect_dtype("logits", logits, DType::F32)?;
    expect_cuda("logits", logits)?;
    if vocab >= 1 << 24 {
        bail!("greedy: a vocabulary of {vocab} does not fit the f32 ids");
    }
    if rows == 0 || vocab == 0 {
        bail!("greedy needs logits, got [{rows}, {vocab}]");
    }
    logits.apply_op1_no_bwd(&OnCuda(Greedy))
}

struct Greedy;

impl CudaOp1 for Greedy {
    const NAME: &'static str = "greedy";

    fn cuda(&self, logits: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        const THREADS: u32 = 1024; // GREEDY_THREADS in sampling.cu
        let dev = logits.device();
        let (rows, vocab) = layout.shape().dims2()?;
        let logits = view::<f32>(logits, layout, "logits")?;
        // SAFETY: the kernel writes both entries of every row.
        let out = unsafe { dev.alloc::<f32>(rows * 2)? };
        let func =
            dev.get_or_load_custom_func("greedy_f32", "text_generation_sampling", SAMPLING_PTX)?;
        let cfg = grid_1d(as_i32(rows, "rows")? as u32, THREADS);
        let stream = dev.cuda_stream();
        let mut launch = Launch::new(&stream);
        launch.buf(&out).buf(&logits).int(as_i32(vocab, "vocab")?);
        // SAFETY: one CTA per row of `vocab` contiguous entries (checked by `view`).
        unsafe { launch.run(&func, cfg) }?;
        Ok((
            f32::wrap_cuda_slice(out, dev.clone()),
            Shape::from((rows, 2)),
        ))
    }
}

/// `logits` (`[rows, vocab]` f32) with the tokens each row's bitmask forbids set to
/// -inf: `allowed` is `[rows, words]` u32, bit `t % 32` of word `t / 32` allowing token
/// `t` (tokens past the words are forbidden); the grammar masks of constrained rows,
/// applied before [`sample`].
pub fn mask_logits(logits: &Tensor, allowed: &Tensor) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    expect_dtype("logits", logits, DType::F32)?;
    expect_dtype("allowed", allowed, DType::U32)?;
    for (name, t) in [("logits", logits), ("allowed", allowed)] {
        expect_cuda(name, t)?;
    }
    let (allowed_rows, _words) = allowed.dims2()?;
    if allowed_rows != rows {
        bail!("mask_logits: {allowed_rows} bitmask rows for {rows} logits rows");
    }
    if rows == 0 || vocab == 0 {
        bail!("mask_logits needs logits, got [{rows}, {vocab}]");
    }
    logits.apply_op1_no_bwd(&OnCuda(MaskLogits { allowed }))
}

struct MaskLogits<'a> {
    allowed: &'a Tensor,
}

impl CudaOp1 for MaskLogits<'_> {
    const NAME: &'static str = "mask_logits";

    fn cuda(&self, logits: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        const THREADS: u32 = 256; // MASK_THREADS in sampling.cu
        let dev = logits.device();
        let (rows, vocab) = layout.shape().dims2()?;
        let words = self.allowed.dim(1)?;
        let logits = view::<f32>(logits, layout, "logits")?;
        let allowed = bound(self.allowed, "allowed");
        let allowed = allowed.view::<u32>()?;
        // SAFETY: the kernel writes every entry.
        let out = unsafe { dev.alloc::<f32>(rows * vocab)? };
        let func = dev.get_or_load_custom_func(
            "mask_logits_f32",
            "text_generation_sampling",
            SAMPLING_PTX,
        )?;
        // A row of a 128k vocabulary in 8 CTAs of 256 threads: 64 entries per thread.
        let ctas_per_row = (vocab as u32).div_ceil(THREADS).min(8);
        let cfg = LaunchConfig {
            grid_dim: (ctas_per_row, grid_yz(rows, "rows")?, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        let mut launch = Launch::new(&stream);
        launch
            .buf(&out)
            .buf(&logits)
            .buf(&allowed)
            .int(as_i32(vocab, "vocab")?)
            .int(as_i32(words, "words")?);
        // SAFETY: `rows` rows of `vocab` contiguous logits and of `words` contiguous
        // bitmask words (checked by `view`), one grid row per row.
        unsafe { launch.run(&func, cfg) }?;
        Ok((
            f32::wrap_cuda_slice(out, dev.clone()),
            Shape::from((rows, vocab)),
        ))
    }
}

/// One row's sampling parameters as [`sample`] reads them (`SampleRow` in sampling.cu).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1: off.
    pub top_p: f32,
    /// 1: off.
    pub typical_p: f32,
    /// 0: off.
    pub min_p: f32,
    pub do_sample: bool,
    pub seed: u64,
    /// The index of the token being chosen: with the seed, the draw's counter.
    pub step: u32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// This row's entries of the penalty pairs.
    pub penalties: std::ops::Range<u32>,
    pub top_n: u32,
}

/// Words per [`SampleRow`] on the device.
pub const SAMPLE_ROW_WORDS: usize = 16;
/// The most alternatives per row ([`SampleRow::top_n`]; `SAMPLE_MAX_TOP_N` in sampling.cu).
pub const SAMPLE_MAX_TOP_N: usize = 32;

impl SampleRow {
    /// The row as the kernel's struct lays it out.
    pub fn to_words(&self) -> [u32; SAMPLE_ROW_WORDS] {
        [
            self.temperature.to_bits(),
            self.top_k,
            self.top_p.to_bits(),
            self.typical_p.to_bits(),
            self.min_p.to_bits(),
            u32::from(self.do_sample),
            self.seed as u32,
            (self.seed >> 32) as u32,
            self.step,
            self.repetition_penalty.to_bits(),
            self.frequency_penalty.to_bits(),
            self.presence_penalty.to_bits(),
            self.penalties.start,
            self.penalties.end,
            self.top_n,
            0,
        ]
    }
}

/// Chooses one token per row of `logits` (`[rows, vocab]` f32): `rows` is `[rows,
/// SAMPLE_ROW_WORDS]` u32 ([`SampleRow::to_words`]), `penalties` `[n, 2]` u32 pairs of
/// (token, times generated), one per token a row has seen, that the rows' ranges
/// index (None: no row has penalties, every range is empty). Returns `[rows, 2 + 2 * top_n]` f32: the chosen id and its logprob under the
/// processed distribution, then `top_n` (id, logprob) pairs of the most likely kept
/// tokens ((-1, NaN) past the kept ones). `top_n` is the largest of the rows'.
pub fn sample(
    logits: &Tensor,
    rows: &Tensor,
    penalties: Option<&Tensor>,
    top_n: usize,
) -> Result<Tensor> {
    let (num_rows, vocab) = logits.dims2()?;
    expect_dtype("logits", logits, DType::F32)?;
    expect_shape("rows", rows, &[num_rows, SAMPLE_ROW_WORDS])?;
    expect_dtype("rows", rows, DType::U32)?;
    for (name, t) in [("logits", logits), ("rows", rows)] {
        expect_cuda(name, t)?;
    }
    if let Some(penalties) = penalties {
        expect_dtype("penalties", penalties, DType::U32)?;
        expect_cuda("penalties", penalties)?;
        if penalties.rank() != 2 || penalties.dim(1)? != 2 {
            bail!("penalties must be [n, 2], got {:?}", penalties.dims());
        }
    }
    if vocab >= 1 << 24 {
        bail!("sample: a vocabulary of {vocab} does not fit the f32 ids");
    }
    if num_rows == 0 || vocab == 0 {
        bail!("sample needs logits, got [{num_rows}, {vocab}]");
    }
    if top_n > SAMPLE_MAX_TOP_N {
        bail!("sample: top_n {top_n} is over {SAMPLE_MAX_TOP_N}");
    }
    logits.apply_op1_no_bwd(&OnCuda(Sample {
        rows,
        penalties,
        top_n,
    }))
}

/// CTAs per row of [`sample`]: the most (up to `SAMPLE_SLICES` = 8, a power of two that
/// divides it) with which the batch still fits the GPU's SMs at one CTA each, so that a
/// lone row is spread over 8 SMs and a large batch takes one per row. Clusters need
/// compute capability 9.0; older GPUs take one CTA per row.
fn sample_cluster(rows: usize, stream: &CudaStream) -> Result<u32> {
    let context = stream.context();
    let major = context
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    if major < 9 {
        return Ok(1);
    }
    let sms = context
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()? as usize;
    Ok([8u32, 4, 2]
        .into_iter()
        .find(|&ctas| rows * ctas as usize <= sms)
        .unwrap_or(1))
}

struct Sample<'a> {
    rows: &'a Tensor,
    penalties: Option<&'a Tensor>,
    top_n: usize,
}

impl CudaOp1 for Sample<'_> {
    const NAME: &'static str = "sample";

    fn cuda(&self, logits: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        const THREADS: u32 = 1024; // SAMPLE_THREADS in sampling.cu
        let dev = logits.device();
        let (num_rows, vocab) = layout.shape().dims2()?;
        let logits = view::<f32>(logits, layout, "logits")?;
        let rows = bound(self.rows, "rows");
        let rows = rows.view::<u32>()?;
        let penalties = self.penalties.map(|p| bound(p, "penalties"));
        let penalties = penalties.as_ref().map(|p| p.view::<u32>()).transpose()?;
        let stride = 2 + 2 * self.top_n;
        // SAFETY: the kernel writes every entry of every row.
        let out = unsafe { dev.alloc::<f32>(num_rows * stride)? };
        // Rows with penalties rewrite their logits there; the kernel reads a row of it
        // only after writing it.
        // SAFETY: as just said.
        let work = unsafe { dev.alloc::<f32>(if penalties.is_some() { num_rows * vocab } else { 1 })? };
        let func =
            dev.get_or_load_custom_func("sample_f32", "text_generation_sampling", SAMPLING_PTX)?;
        let stream = dev.cuda_stream();
        let cluster = sample_cluster(num_rows, &stream)?;
        let cfg = grid_1d(as_i32(num_rows * cluster as usize, "rows")? as u32, THREADS);
        let mut launch = Launch::new(&stream);
        launch.in_clusters(cluster);
        launch.buf(&out).buf(&work).buf(&logits).buf(&rows);
        match &penalties {
            Some(penalties) => launch.buf(penalties),
            None => launch.null(),
        };
        launch.int(as_i32(vocab, "vocab")?).int(stride as i32);
        // SAFETY: one cluster per row of `vocab` contiguous logits (checked by `view`),
        // a row of `rows` each; the kernel reads the penalty entries the rows' ranges
        // name, which the caller builds from `penalties` itself.
        unsafe { launch.run(&func, cfg) }?;
        Ok((
            f32::wrap_cuda_slice(out, dev.clone()),
            Shape::from((num_rows, stride)),
        ))
    }
}

/// Attention of one new query token per sequence (`q`: `[num_seqs, heads, head_dim]`)
/// against its paged context: `block_tables` `[num_seqs, max_blocks]` u32,
/// `context_lens` `[num_seqs]` u32 (the new token included, its K/V already cached).
/// With `sliding_window = Some(w)` the query sees its last `w` positions, itself
/// included. A sequence with an empty context gets zeros.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_decode(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    block_size: usize,
    scale: f32,
    sliding_window: Option<usize>,
) -> Result<Tensor> {
    let paged = PagedKv::new(
        q,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        block_size,
        scale,
        sliding_window,
    )?;
    if paged.q_rows == 0 {
        return q.zeros_like();
    }
    q.apply_op1_no_bwd(&OnCuda(Decode(paged)))
}

/// Causal attention for a ragged prefill batch. `q` is `[total_new_tokens, heads,
/// head_dim]`, sequence `s` owning rows `cu_seqlens_q[s]..cu_seqlens_q[s + 1]`
/// (`[num_seqs + 1]` u32, last entry = total_new_tokens); these are the LAST
/// positions of its `context_lens[s]`, the earlier ones being a cached prefix. K/V
/// of all positions are read from the cache. `sliding_window` as in
/// [`paged_attention_decode`].
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_prefill(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    cu_seqlens_q: &Tensor,
    context_lens: &Tensor,
    block_tables: &Tensor,
    block_size: usize,
    scale: f32,
    sliding_window: Option<usize>,
) -> Result<Tensor> {
    let paged = PagedKv::new(
        q,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        block_size,
        scale,
        sliding_window,
    )?;
    expect_shape("cu_seqlens_q", cu_seqlens_q, &[paged.num_seqs + 1])?;
    expect_dtype("cu_seqlens_q", cu_seqlens_q, DType::U32)?;
    expect_cuda("cu_seqlens_q", cu_seqlens_q)?;
    if paged.q_rows == 0 {
        return q.zeros_like();
    }
    q.apply_op1_no_bwd(&OnCuda(Prefill {
        paged,
        cu_seqlens_q,
    }))
}

/// The arguments both attention kernels share, validated.
struct PagedKv<'a> {
    key_cache: &'a Tensor,
    value_cache: &'a Tensor,
    block_tables: &'a Tensor,
    context_lens: &'a Tensor,
    dtype: DType,
    q_rows: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    num_seqs: usize,
    max_blocks: usize,
    block_size: usize,
    num_blocks: usize,
    scale: f32,
    /// 0 = no window.
    window: i32,
}

impl<'a> PagedKv<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        q: &Tensor,
        key_cache: &'a Tensor,
        value_cache: &'a Tensor,
        block_tables: &'a Tensor,
        context_lens: &'a Tensor,
        block_size: usize,
        scale: f32,
        sliding_window: Option<usize>,
    ) -> Result<Self> {
        let (q_rows, num_heads, head_dim) = q.dims3()?;
        let (num_slots, num_kv_heads, cache_head_dim) = key_cache.dims3()?;
        expect_shape("value_cache", value_cache, key_cache.dims())?;
        let (num_seqs, max_blocks) = block_tables.dims2()?;
        expect_shape("context_lens", context_lens, &[num_seqs])?;
        if cache_head_dim != head_dim {
            bail!("q head_dim {head_dim} differs from the cache's {cache_head_dim}");
        }
        if !HEAD_DIMS.contains(&head_dim) {
            bail!("paged attention supports head_dim {HEAD_DIMS:?}, got {head_dim}");
        }
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})");
        }
        if !block_size.is_power_of_two() {
            bail!("block_size must be a power of two (the kernels shift by it), got {block_size}");
        }
        if num_slots % block_size != 0 || num_slots == 0 {
            bail!("cache of {num_slots} slots is not a whole, non-zero number of blocks of {block_size}");
        }
        if max_blocks == 0 {
            bail!("block_tables needs at least one column");
        }
        if !(scale.is_finite() && scale > 0.) {
            bail!("scale must be a positive number, got {scale}");
        }
        if sliding_window == Some(0) {
            bail!("a sliding window must hold at least one token");
        }
        let dtype = half_dtype("q", q)?;
        for (name, t) in [("key_cache", key_cache), ("value_cache", value_cache)] {
            expect_dtype(name, t, dtype)?;
        }
        for (name, t) in [
            ("block_tables", block_tables),
            ("context_lens", context_lens),
        ] {
            expect_dtype(name, t, DType::U32)?;
        }
        for (name, t) in [
            ("q", q),
            ("key_cache", key_cache),
            ("value_cache", value_cache),
            ("block_tables", block_tables),
            ("context_lens", context_lens),
        ] {
            expect_cuda(name, t)?;
        }
        // Positions are i32 in the kernels.
        as_i32(max_blocks * block_size, "max_blocks * block_size")?;
        Ok(Self {
            key_cache,
            value_cache,
            block_tables,
            context_lens,
            dtype,
            q_rows,
            num_heads,
            num_kv_heads,
            head_dim,
            num_seqs,
            max_blocks,
            block_size,
            num_blocks: num_slots / block_size,
            scale,
            window: sliding_window.map_or(Ok(0), |w| as_i32(w, "sliding_window"))?,
        })
    }

    fn kernel_suffix(&self) -> String {
        let ty = if self.dtype == DType::BF16 {
            "bf16"
        } else {
            "f16"
        };
        format!("{ty}_d{}", self.head_dim)
    }
}

/// A kernel op on one main operand that runs on CUDA devices only; [`OnCuda`] makes it
/// a candle custom op.
trait CudaOp1 {
    /// The public function's name, for candle and for errors.
    const NAME: &'static str;

    fn cuda(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)>;
}

struct OnCuda<O>(O);

impl<O: CudaOp1> candle_core::CustomOp1 for OnCuda<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("{} runs on CUDA devices only", O::NAME)
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        self.0.cuda(storage, layout)
    }
}

/// Storage of a tensor passed next to the op's main operand, read-locked.
struct Bound<'t, G> {
    storage: G,
    layout: &'t Layout,
    name: &'static str,
}

fn bound<'t>(
    tensor: &'t Tensor,
    name: &'static str,
) -> Bound<'t, impl Deref<Target = Storage> + 't> {
    let (storage, layout) = tensor.storage_and_layout();
    Bound {
        storage,
        layout,
        name,
    }
}

impl<G: Deref<Target = Storage>> Bound<'_, G> {
    fn cuda(&self) -> Result<&CudaStorage> {
        match &*self.storage {
            Storage::Cuda(s) => Ok(s),
            _ => bail!("{} must be on a CUDA device", self.name),
        }
    }

    fn view<T: CudaDType>(&self) -> Result<CudaView<'_, T>> {
        view::<T>(self.cuda()?, self.layout, self.name)
    }

    fn rows_view<T: CudaDType>(&self) -> Result<(CudaView<'_, T>, i64)> {
        rows_view::<T>(self.cuda()?, self.layout, self.name)
    }
}

struct Decode<'a>(PagedKv<'a>);

impl CudaOp1 for Decode<'_> {
    const NAME: &'static str = "paged_attention_decode";

    fn cuda(&self, q: &CudaStorage, q_l: &Layout) -> Result<(CudaStorage, Shape)> {
        match self.0.dtype {
            DType::BF16 => self.launch::<half::bf16>(q, q_l),
            _ => self.launch::<half::f16>(q, q_l),
        }
    }
}

impl Decode<'_> {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let p = &self.0;
        let dev: &CudaDevice = q.device();
        let q_view = view::<T>(q, q_l, "q")?;
        let (kc, vc) = (
            bound(p.key_cache, "key_cache"),
            bound(p.value_cache, "value_cache"),
        );
        let (bt, cl) = (
            bound(p.block_tables, "block_tables"),
            bound(p.context_lens, "context_lens"),
        );
        let (kc, vc, bt, cl) = (
            kc.view::<T>()?,
            vc.view::<T>()?,
            bt.view::<u32>()?,
            cl.view::<u32>()?,
        );

        let group = p.num_heads / p.num_kv_heads;
        let heads_per_cta = DECODE_HEADS_PER_CTA
            .into_iter()
            .find(|h| group % h == 0)
            .unwrap_or(1);
        // Few sequences leave most SMs idle unless their contexts are split finely; the
        // split depends on shapes only (not on the lengths), so CUDA graphs can hold it.
        let ctas_per_part = (p.num_heads / heads_per_cta) * p.num_seqs;
        // At most DECODE_MAX_PARTS partitions where the shared memory allows: the
        // reduction walks them one by one.
        let ctx_cap = p.max_blocks * p.block_size;
        let partition = (DECODE_TYPICAL_CONTEXT * ctas_per_part / DECODE_TARGET_CTAS)
            .max(ctx_cap.div_ceil(DECODE_MAX_PARTS))
            .next_power_of_two()
            .clamp(DECODE_MIN_PARTITION, DECODE_MAX_PARTITION);
        let num_parts = ctx_cap.div_ceil(partition);
        let rows = p.num_seqs * p.num_heads;
        // SAFETY: every output row is written by the kernels (zeros for an empty context).
        let out = unsafe { dev.alloc::<T>(rows * p.head_dim)? };
        let split = if num_parts > 1 {
            // SAFETY: the reduction reads only the partitions the decode kernel wrote.
            unsafe {
                Some((
                    dev.alloc::<f32>(rows * num_parts)?,
                    dev.alloc::<f32>(rows * num_parts)?,
                    dev.alloc::<f32>(rows * num_parts * p.head_dim)?,
                ))
            }
        } else {
            None
        };

        let suffix = p.kernel_suffix();
        let func = dev.get_or_load_custom_func(
            &format!("paged_attention_decode_{suffix}_h{heads_per_cta}"),
            "text_generation_decode",
            DECODE_PTX,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (
                (p.num_heads / heads_per_cta) as u32,
                grid_yz(p.num_seqs, "num_seqs")?,
                grid_yz(num_parts, "context partitions")?,
            ),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (num_heads, num_kv_heads) = (p.num_heads as i32, p.num_kv_heads as i32);
        let (max_blocks, block_shift) = (p.max_blocks as i32, p.block_size.trailing_zeros() as i32);
        let num_blocks = u32::try_from(p.num_blocks).unwrap_or(u32::MAX);
        let (parts, partition) = (num_parts as i32, partition as i32);
        let stream = dev.cuda_stream();
        let mut launch = Launch::new(&stream);
        launch.buf(&out);
        match &split {
            Some((max, sum, part_out)) => launch.buf(max).buf(sum).buf(part_out),
            // unused partial-result buffers in single-partition mode
            None => launch.null().null().null(),
        };
        launch.buf(&q_view).buf(&kc).buf(&vc).buf(&bt).buf(&cl);
        launch
            .int(num_heads)
            .int(num_kv_heads)
            .int(max_blocks)
            .int(block_shift)
            .uint(num_blocks);
        launch
            .float(p.scale)
            .int(p.window)
            .int(parts)
            .int(partition);
        // SAFETY: shapes validated in `PagedKv::new`; positions are bounded by the
        // block table width and block ids clamped to the cache in the kernel.
        unsafe { launch.run(&func, cfg) }?;

        if let Some((max, sum, part_out)) = &split {
            let func = dev.get_or_load_custom_func(
                &format!("paged_attention_decode_reduce_{suffix}"),
                "text_generation_decode",
                DECODE_PTX,
            )?;
            let cfg = LaunchConfig {
                grid_dim: (p.num_heads as u32, p.num_seqs as u32, 1),
                block_dim: (p.head_dim as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = Launch::new(&stream);
            launch.buf(&out).buf(max).buf(sum).buf(part_out).buf(&cl);
            launch
                .int(num_heads)
                .int(max_blocks)
                .int(block_shift)
                .int(p.window)
                .int(parts)
                .int(partition);
            // SAFETY: same buffers and bounds as the launch above.
            unsafe { launch.run(&func, cfg) }?;
        }
        Ok((
            T::wrap_cuda_slice(out, dev.clone()),
            Shape::from((p.num_seqs, p.num_heads, p.head_dim)),
        ))
    }
}

struct Prefill<'a> {
    paged: PagedKv<'a>,
    cu_seqlens_q: &'a Tensor,
}

impl CudaOp1 for Prefill<'_> {
    const NAME: &'static str = "paged_attention_prefill";

    fn cuda(&self, q: &CudaStorage, q_l: &Layout) -> Result<(CudaStorage, Shape)> {
        match self.paged.dtype {
            DType::BF16 => self.launch::<half::bf16>(q, q_l),
            _ => self.launch::<half::f16>(q, q_l),
        }
    }
}

impl Prefill<'_> {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let p = &self.paged;
        let dev: &CudaDevice = q.device();
        let q_view = view::<T>(q, q_l, "q")?;
        let (kc, vc) = (
            bound(p.key_cache, "key_cache"),
            bound(p.value_cache, "value_cache"),
        );
        let (bt, cl) = (
            bound(p.block_tables, "block_tables"),
            bound(p.context_lens, "context_lens"),
        );
        let cu = bound(self.cu_seqlens_q, "cu_seqlens_q");
        let (kc, vc, bt, cl, cu) = (
            kc.view::<T>()?,
            vc.view::<T>()?,
            bt.view::<u32>()?,
            cl.view::<u32>()?,
            cu.view::<u32>()?,
        );

        // SAFETY: the query tiles of all sequences cover rows 0..cu_seqlens_q[num_seqs],
        // which the caller guarantees to be every row of q.
        let out = unsafe { dev.alloc::<T>(p.q_rows * p.num_heads * p.head_dim)? };
        let func = dev.get_or_load_custom_func(
            &format!("paged_attention_prefill_{}", p.kernel_suffix()),
            "text_generation_prefill",
            PREFILL_PTX,
        )?;
        // Sum over sequences of ceil(len / BM) is at most this; the kernel maps each
        // block to its (sequence, tile) and surplus blocks exit.
        let tiles = p.q_rows.div_ceil(PREFILL_BLOCK_M) + p.num_seqs;
        // The K and V stage rings, rows padded by 8 elements (past the 48 KiB a
        // kernel gets without opting in).
        let smem =
            2 * PREFILL_STAGES * PREFILL_BLOCK_N * (p.head_dim + 8) * std::mem::size_of::<T>();
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let cfg = LaunchConfig {
            grid_dim: (
                as_i32(tiles, "query tiles")? as u32,
                grid_yz(p.num_heads, "num_heads")?,
                1,
            ),
            block_dim: (PREFILL_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (num_seqs, num_heads, num_kv_heads) =
            (p.num_seqs as i32, p.num_heads as i32, p.num_kv_heads as i32);
        let (max_blocks, block_shift) = (p.max_blocks as i32, p.block_size.trailing_zeros() as i32);
        let num_blocks = u32::try_from(p.num_blocks).unwrap_or(u32::MAX);
        let stream = dev.cuda_stream();
        let mut launch = Launch::new(&stream);
        launch
            .buf(&out)
            .buf(&q_view)
            .buf(&kc)
            .buf(&vc)
            .buf(&cu)
            .buf(&cl)
            .buf(&bt);
        launch
            .int(num_seqs)
            .int(num_heads)
            .int(num_kv_heads)
            .int(max_blocks)
            .int(block_shift);
        launch.uint(num_blocks).float(p.scale).int(p.window);
        // SAFETY: shapes validated in `PagedKv::new`; see `Decode::launch`.
        unsafe { launch.run(&func, cfg) }?;
        Ok((
            T::wrap_cuda_slice(out, dev.clone()),
            Shape::from((p.q_rows, p.num_heads, p.head_dim)),
        ))
    }
}

/// A contiguous tensor's device memory. Element (16-bit) tensors are read and
/// written in 16-byte vectors, so their start must be 16-byte aligned.
fn view<'s, T: CudaDType>(
    storage: &'s CudaStorage,
    layout: &Layout,
    name: &str,
) -> Result<CudaView<'s, T>> {
    let (start, end) = contiguous(name, layout)?;
    if std::mem::size_of::<T>() == 2 && start % 8 != 0 {
        bail!("{name} starts at element {start} of its buffer; the kernels need a multiple of 8 (call .copy())");
    }
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// The memory of a matrix whose rows are contiguous but may lie apart (a column range
/// of a wider matrix), and its row stride in elements.
fn rows_view<'s, T: CudaDType>(
    storage: &'s CudaStorage,
    layout: &Layout,
    name: &str,
) -> Result<(CudaView<'s, T>, i64)> {
    let (rows, cols) = layout.shape().dims2()?;
    let [row_stride, col_stride] = layout.stride() else {
        bail!("{name} must be a matrix")
    };
    if (cols > 1 && *col_stride != 1) || (rows > 1 && *row_stride < cols) {
        bail!("{name} must have contiguous, non-overlapping rows (call .contiguous() first)");
    }
    let row_stride = if rows > 1 { *row_stride } else { cols };
    let start = layout.start_offset();
    if std::mem::size_of::<T>() == 2 && (start % 8 != 0 || row_stride % 8 != 0 || cols % 8 != 0) {
        bail!("{name}'s rows must start on 16-byte boundaries (offset {start}, stride {row_stride}, width {cols} elements)");
    }
    let end = start + (rows.max(1) - 1) * row_stride + cols;
    Ok((
        storage.as_cuda_slice::<T>()?.slice(start..end),
        row_stride as i64,
    ))
}

fn contiguous(name: &str, layout: &Layout) -> Result<(usize, usize)> {
    match layout.contiguous_offsets() {
        Some(offsets) => Ok(offsets),
        None => bail!("{name} must be contiguous (call .contiguous() first)"),
    }
}

fn expect_shape(name: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() != dims {
        bail!("{name} has shape {:?}, expected {dims:?}", t.dims());
    }
    Ok(())
}

fn expect_dtype(name: &str, t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        bail!("{name} has dtype {:?}, expected {dtype:?}", t.dtype());
    }
    Ok(())
}

fn expect_cuda(name: &str, t: &Tensor) -> Result<()> {
    if !t.device().is_cuda() {
        bail!(
            "{name} must be on a CUDA device, it is on {:?}",
            t.device().location()
        );
    }
    Ok(())
}

/// The attention element types the kernels are built for.
fn half_dtype(name: &str, t: &Tensor) -> Result<DType> {
    match t.dtype() {
        dtype @ (DType::BF16 | DType::F16) => Ok(dtype),
        other => bail!("{name} has dtype {other:?}; the kernels take bf16 or f16"),
    }
}

fn as_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).or_else(|_| bail!("{what} = {v} does not fit the kernels' 32-bit indices"))
}

/// `blocks` CTAs of `threads` threads in one dimension, without dynamic shared memory.
fn grid_1d(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid's y or z extent (CUDA caps them at 65535; x goes to 2^31 - 1).
fn grid_yz(v: usize, what: &str) -> Result<u32> {
    match u16::try_from(v) {
        Ok(v) => Ok(u32::from(v)),
        Err(_) => bail!("{what} = {v} exceeds the CUDA grid limit of 65535"),
    }
}

/// One kernel launch, with programmatic dependent launch on GPUs that have it (compute
/// capability 9.0 and newer): the kernel may then start while its predecessor in the
/// stream drains, which hides launch latency and lets GEMV CTAs fetch weights early;
/// every kernel of this crate waits for its predecessor before touching data
/// (`await_previous_kernel` in common.cuh). `KERNELS_PDL=0` launches plainly, for
/// comparisons.
struct Launch<'a> {
    stream: &'a CudaStream,
    /// Each argument widened to 8 bytes (little-endian): the driver reads as many bytes
    /// as the kernel's parameter has.
    args: Vec<u64>,
    /// Record the buffers' uses on the stream once the launch is queued (cudarc's
    /// cross-stream bookkeeping).
    uses: Vec<SyncOnDrop<'a>>,
    /// CTAs per thread block cluster along x (1: no clusters).
    cluster: u32,
}

impl<'a> Launch<'a> {
    fn new(stream: &'a CudaStream) -> Self {
        Self {
            stream,
            args: Vec::with_capacity(20),
            uses: Vec::with_capacity(10),
            cluster: 1,
        }
    }

    /// Groups the grid's CTAs into clusters of `ctas` along x (Hopper and newer), whose
    /// CTAs share their shared memory.
    fn in_clusters(&mut self, ctas: u32) -> &mut Self {
        self.cluster = ctas;
        self
    }

    /// A device buffer the kernel reads or writes. Buffers written through a shared
    /// borrow (the KV cache) are safe because all work runs on the device's one
    /// stream, in order.
    fn buf<T>(&mut self, buffer: &'a impl DevicePtr<T>) -> &mut Self {
        let (ptr, used) = buffer.device_ptr(self.stream);
        self.args.push(ptr);
        self.uses.push(used);
        self
    }

    /// A device pointer the kernel ignores (an unused optional buffer).
    fn null(&mut self) -> &mut Self {
        self.args.push(0);
        self
    }

    fn int(&mut self, v: i32) -> &mut Self {
        self.args.push(u64::from(v as u32));
        self
    }

    fn uint(&mut self, v: u32) -> &mut Self {
        self.args.push(u64::from(v));
        self
    }

    fn long(&mut self, v: i64) -> &mut Self {
        self.args.push(v as u64);
        self
    }

    fn float(&mut self, v: f32) -> &mut Self {
        self.args.push(u64::from(v.to_bits()));
        self
    }

    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, and
    /// the buffers must hold everything the kernel reads or writes for `cfg`.
    unsafe fn run(mut self, func: &CudaFunction, cfg: LaunchConfig) -> Result<()> {
        self.stream.context().bind_to_thread().w()?;
        let mut params: Vec<*mut std::ffi::c_void> = self
            .args
            .iter_mut()
            .map(|arg| (arg as *mut u64).cast())
            .collect();
        let mut attributes: Vec<sys::CUlaunchAttribute> = Vec::with_capacity(2);
        if programmatic_launch(self.stream)? {
            let mut attribute: sys::CUlaunchAttribute = std::mem::zeroed();
            attribute.id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attribute.value.programmaticStreamSerializationAllowed = 1;
            attributes.push(attribute);
        }
        if self.cluster > 1 {
            let mut attribute: sys::CUlaunchAttribute = std::mem::zeroed();
            attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attribute.value.clusterDim.x = self.cluster;
            attribute.value.clusterDim.y = 1;
            attribute.value.clusterDim.z = 1;
            attributes.push(attribute);
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attributes.as_mut_ptr(),
            numAttrs: attributes.len() as u32,
        };
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
        .w()?;
        drop(self.uses);
        Ok(())
    }
}

/// Whether kernels are launched with programmatic dependent launch (see [`Launch`]);
/// decided once per process.
fn programmatic_launch(stream: &CudaStream) -> Result<bool> {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    if let Some(&enabled) = ENABLED.get() {
        return Ok(enabled);
    }
    let major = stream
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let wanted = std::env::var("KERNELS_PDL").map_or(true, |v| v != "0");
    Ok(*ENABLED.get_or_init(|| wanted && major >= 9))
}
