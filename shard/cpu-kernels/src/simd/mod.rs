//! The vector operations the kernel is written in, for 8 f32 lanes: AVX2+FMA
//! (`avx2.rs`) and a portable version with the same lane layout and the same operations
//! (`portable.rs`), so both give the same bits.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
pub(crate) mod portable;

use crate::blocks::{ChunkParams, Format, HalfToF32, CHUNK};
use crate::matmul::Job;
use std::ops::Range;

/// Lanes per vector.
pub(crate) const LANES: usize = 8;

/// One instruction set. Every method is `unsafe`: it may only be called where the
/// instruction set is available, and pointers must be valid for `LANES` (or `CHUNK`) values.
pub(crate) trait Simd: Copy + HalfToF32 {
    type F32s: Copy;
    /// Vector registers the compiled code may use (register tiles are sized to fit).
    const REGISTERS: usize;
    unsafe fn zero() -> Self::F32s;
    unsafe fn load(p: *const f32) -> Self::F32s;
    unsafe fn store(p: *mut f32, v: Self::F32s);
    /// Asks for the cache line holding `p` ahead of its use (any address: never faults).
    unsafe fn prefetch(p: *const u8);
    /// `a * b + acc`, rounded once.
    unsafe fn mul_add(a: Self::F32s, b: Self::F32s, acc: Self::F32s) -> Self::F32s;
    /// The sum of the lanes, as `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`.
    unsafe fn sum(v: Self::F32s) -> f32;
    /// Chunk `chunk` of `block`, dequantized.
    unsafe fn dequantize_chunk<F: Format>(
        block: &[u8],
        chunk: usize,
    ) -> [Self::F32s; CHUNK / LANES];
    /// Runs `job` for the output tiles `tiles` on this thread, `panel` its scratch space.
    unsafe fn run<F: Format>(job: &Job, tiles: Range<usize>, panel: &mut Vec<f32>);
}

/// `q * scale + offset` of one chunk's 32 values, the scale and offset by half: shared
/// by both instruction sets, so the dequantized weights are the same bits.
#[inline(always)]
pub(crate) fn dequantize_value(q: i8, index: usize, params: &ChunkParams) -> f32 {
    let half = index / (CHUNK / 2);
    (q as f32).mul_add(params.scale[half], params.offset[half])
}
