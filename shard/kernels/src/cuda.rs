//! Host side of the kernels in `src/cu`: shape/dtype validation, then launches
//! through candle's custom-op traits so that the outputs are ordinary tensors and
//! the in-place cache writes get candle's mutable storage access.

use std::ops::Deref;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, DType, InplaceOp3, Layout, Result, Shape, Storage,
    Tensor,
};

const CACHE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cache.ptx"));
const DECODE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
const PREFILL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/prefill.ptx"));
const ACTIVATION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/activation.ptx"));
const GEMV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx"));
const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));

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
/// The most activation rows [`gemv`] takes (gemv.cu instantiates 1 to 8).
pub const GEMV_MAX_ROWS: usize = 8;
/// Query heads per decode CTA that have kernels (decode.cu instantiates these).
const DECODE_HEADS_PER_CTA: [usize; 5] = [8, 4, 3, 2, 1];

/// Writes `key`/`value` (`[tokens, kv_heads, head_dim]`) into `key_cache`/`value_cache`
/// (`[num_slots, kv_heads, head_dim]`) at `slots` (`[tokens]`, i64). A negative slot
/// marks a padding token and is skipped, as is a slot past the cache.
pub fn reshape_and_cache(
    key: &Tensor,
    value: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slots: &Tensor,
) -> Result<()> {
    let (tokens, kv_heads, head_dim) = key.dims3()?;
    expect_shape("value", value, key.dims())?;
    let (_, cache_kv_heads, cache_head_dim) = key_cache.dims3()?;
    if (cache_kv_heads, cache_head_dim) != (kv_heads, head_dim) {
        bail!(
            "key_cache rows are [{cache_kv_heads}, {cache_head_dim}] but key rows are [{kv_heads}, {head_dim}]"
        );
    }
    expect_shape("value_cache", value_cache, key_cache.dims())?;
    expect_shape("slots", slots, &[tokens])?;
    expect_dtype("slots", slots, DType::I64)?;
    let dtype = half_dtype("key", key)?;
    for (name, t) in [
        ("value", value),
        ("key_cache", key_cache),
        ("value_cache", value_cache),
    ] {
        expect_dtype(name, t, dtype)?;
    }
    for (name, t) in [
        ("key", key),
        ("value", value),
        ("key_cache", key_cache),
        ("value_cache", value_cache),
        ("slots", slots),
    ] {
        expect_cuda(name, t)?;
    }
    if (kv_heads * head_dim) % 8 != 0 {
        bail!("reshape_and_cache copies 16-byte vectors: kv_heads * head_dim ({}) must be a multiple of 8", kv_heads * head_dim);
    }
    if tokens == 0 {
        return Ok(());
    }
    let op = CacheWrite {
        row_vecs: as_i32(kv_heads * head_dim / 8, "kv_heads * head_dim / 8")?,
    };
    key_cache.inplace_op3(key, slots, &op)?;
    value_cache.inplace_op3(value, slots, &op)
}

/// Copies token rows into the cache tensor it is applied to (the op's destination).
struct CacheWrite {
    row_vecs: i32,
}

impl InplaceOp3 for CacheWrite {
    fn name(&self) -> &'static str {
        "reshape-and-cache"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("reshape_and_cache runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        cache: &mut CudaStorage,
        cache_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
        slots: &CudaStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        fn launch<T: CudaDType + DeviceRepr>(
            op: &CacheWrite,
            cache: &mut CudaStorage,
            cache_l: &Layout,
            src: &CudaStorage,
            src_l: &Layout,
            slots: &CudaStorage,
            slots_l: &Layout,
        ) -> Result<()> {
            let dev = cache.device().clone();
            let src = view::<T>(src, src_l, "key/value")?;
            let slots = view::<i64>(slots, slots_l, "slots")?;
            let (start, end) = contiguous("cache", cache_l)?;
            if start % 8 != 0 {
                bail!(
                    "the cache starts at element {start} of its buffer; it must be 16-byte aligned"
                );
            }
            let num_slots = cache_l.dims()[0] as i64;
            let mut cache = cache.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
            let func = dev.get_or_load_custom_func(
                "reshape_and_cache",
                "text_generation_cache",
                CACHE_PTX,
            )?;
            let cfg = LaunchConfig {
                grid_dim: (slots.len() as u32, 1, 1),
                block_dim: (op.row_vecs.clamp(32, 256) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut builder = func.builder();
            builder
                .arg(&src)
                .arg(&mut cache)
                .arg(&slots)
                .arg(&op.row_vecs)
                .arg(&num_slots);
            // SAFETY: shapes were validated by `reshape_and_cache`; the kernel writes
            // only rows 0..num_slots of the cache.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(())
        }
        match cache.dtype() {
            DType::BF16 => launch::<half::bf16>(self, cache, cache_l, src, src_l, slots, slots_l),
            DType::F16 => launch::<half::f16>(self, cache, cache_l, src, src_l, slots, slots_l),
            other => bail!("reshape_and_cache: unsupported dtype {other:?}"),
        }
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
    gate_up.apply_op1_no_bwd(&SiluMul)
}

struct SiluMul;

impl candle_core::CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("silu_mul runs on CUDA devices only")
    }

    fn cuda_fwd(&self, input: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
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
            let cfg = LaunchConfig {
                grid_dim: (vecs.div_ceil(THREADS).min(1 << 16) as u32, 1, 1),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (rows, vecs_per_row) = (rows as i64, as_i32(half / 8, "I / 8")?);
            let mut builder = func.builder();
            builder.arg(&out).arg(&view).arg(&rows).arg(&vecs_per_row);
            // SAFETY: `out` holds rows * I elements, `view` rows * 2I (checked shapes).
            unsafe { builder.launch(cfg) }.w()?;
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
        let cfg = LaunchConfig {
            grid_dim: (as_i32(rows, "rows")? as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_arg, vecs) = (rows as i64, as_i32(width / 8, "H / 8")?);
        let mut builder = func.builder();
        builder.arg(&out).arg(&x).arg(&h).arg(&w).arg(&rows_arg).arg(&vecs).arg(&self.eps);
        // SAFETY: shapes checked in `add_rms_norm`, contiguity and alignment by `view`.
        unsafe { builder.launch(cfg) }.w()?;
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
    expect_cuda("w", w)?;
    x.apply_op2_no_bwd(w, &Gemv)
}

struct Gemv;

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
        fn launch<T: CudaDType + DeviceRepr>(
            x: &CudaStorage,
            x_l: &Layout,
            w: &CudaStorage,
            w_l: &Layout,
            name: &str,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = x.device();
            let (m, k) = x_l.shape().dims2()?;
            let n = w_l.shape().dims()[0];
            let (x, w) = (view::<T>(x, x_l, "x")?, view::<T>(w, w_l, "w")?);
            // SAFETY: the kernel writes every output element.
            let y = unsafe { dev.alloc::<T>(m * n)? };
            let func = dev.get_or_load_custom_func(
                &format!("gemv_{name}_m{m}"),
                "text_generation_gemv",
                GEMV_PTX,
            )?;
            let cfg = LaunchConfig {
                grid_dim: (as_i32(n, "n")? as u32, 1, 1),
                block_dim: (GEMV_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let (n_out, k_vecs) = (as_i32(n, "n")?, as_i32(k / 8, "k / 8")?);
            let mut builder = func.builder();
            builder.arg(&y).arg(&x).arg(&w).arg(&n_out).arg(&k_vecs);
            // SAFETY: shapes checked in `gemv`; `view` checked contiguity and alignment.
            unsafe { builder.launch(cfg) }.w()?;
            Ok((T::wrap_cuda_slice(y, dev.clone()), Shape::from((m, n))))
        }
        match x.dtype() {
            DType::BF16 => launch::<half::bf16>(x, x_l, w, w_l, "bf16"),
            DType::F16 => launch::<half::f16>(x, x_l, w, w_l, "f16"),
            other => bail!("gemv: unsupported dtype {other:?}"),
        }
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
    q.apply_op1_no_bwd(&Decode(paged))
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
    q.apply_op1_no_bwd(&Prefill {
        paged,
        cu_seqlens_q,
    })
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
    fn view<T: CudaDType>(&self) -> Result<CudaView<'_, T>> {
        match &*self.storage {
            Storage::Cuda(s) => view::<T>(s, self.layout, self.name),
            _ => bail!("{} must be on a CUDA device", self.name),
        }
    }
}

struct Decode<'a>(PagedKv<'a>);

impl candle_core::CustomOp1 for Decode<'_> {
    fn name(&self) -> &'static str {
        "paged-attention-decode"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("paged_attention_decode runs on CUDA devices only")
    }

    fn cuda_fwd(&self, q: &CudaStorage, q_l: &Layout) -> Result<(CudaStorage, Shape)> {
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
        let parts = num_parts as i32;
        let null = 0u64; // unused partial-result buffers in single-partition mode
        let mut builder = func.builder();
        builder.arg(&out);
        match &split {
            Some((max, sum, part_out)) => builder.arg(max).arg(sum).arg(part_out),
            None => builder.arg(&null).arg(&null).arg(&null),
        };
        builder.arg(&q_view).arg(&kc).arg(&vc).arg(&bt).arg(&cl);
        builder
            .arg(&num_heads)
            .arg(&num_kv_heads)
            .arg(&max_blocks)
            .arg(&block_shift)
            .arg(&num_blocks);
        let partition = partition as i32;
        builder.arg(&p.scale).arg(&p.window).arg(&parts).arg(&partition);
        // SAFETY: shapes validated in `PagedKv::new`; positions are bounded by the
        // block table width and block ids clamped to the cache in the kernel.
        unsafe { builder.launch(cfg) }.w()?;

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
            let mut builder = func.builder();
            builder.arg(&out).arg(max).arg(sum).arg(part_out).arg(&cl);
            builder
                .arg(&num_heads)
                .arg(&max_blocks)
                .arg(&block_shift)
                .arg(&p.window)
                .arg(&parts)
                .arg(&partition);
            // SAFETY: same buffers and bounds as the launch above.
            unsafe { builder.launch(cfg) }.w()?;
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

impl candle_core::CustomOp1 for Prefill<'_> {
    fn name(&self) -> &'static str {
        "paged-attention-prefill"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("paged_attention_prefill runs on CUDA devices only")
    }

    fn cuda_fwd(&self, q: &CudaStorage, q_l: &Layout) -> Result<(CudaStorage, Shape)> {
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
        let mut builder = func.builder();
        builder
            .arg(&out)
            .arg(&q_view)
            .arg(&kc)
            .arg(&vc)
            .arg(&cu)
            .arg(&cl)
            .arg(&bt);
        builder
            .arg(&num_seqs)
            .arg(&num_heads)
            .arg(&num_kv_heads)
            .arg(&max_blocks)
            .arg(&block_shift);
        builder.arg(&num_blocks).arg(&p.scale).arg(&p.window);
        // SAFETY: shapes validated in `PagedKv::new`; see `Decode::launch`.
        unsafe { builder.launch(cfg) }.w()?;
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

/// A grid's y or z extent (CUDA caps them at 65535; x goes to 2^31 - 1).
fn grid_yz(v: usize, what: &str) -> Result<u32> {
    match u16::try_from(v) {
        Ok(v) => Ok(u32::from(v)),
        Err(_) => bail!("{what} = {v} exceeds the CUDA grid limit of 65535"),
    }
}
