//! The portable instruction set: plain arrays of 8 lanes, the same operations as AVX2.

use super::{dequantize_value, Simd, LANES};
use crate::blocks::{f16_to_f32, Format, HalfToF32, CHUNK};
use crate::matmul::{run_tiles, Job};
use std::ops::Range;

#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl HalfToF32 for Portable {
    #[inline(always)]
    unsafe fn half_to_f32(bits: u16) -> f32 {
        f16_to_f32(bits)
    }
}

impl Simd for Portable {
    type F32s = [f32; LANES];
    const REGISTERS: usize = 16;

    #[inline(always)]
    unsafe fn zero() -> Self::F32s {
        [0.; LANES]
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::F32s {
        std::ptr::read_unaligned(p.cast())
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::F32s) {
        std::ptr::write_unaligned(p.cast(), v)
    }

    #[inline(always)]
    unsafe fn prefetch(_: *const u8) {}

    #[inline(always)]
    unsafe fn mul_add(a: Self::F32s, b: Self::F32s, acc: Self::F32s) -> Self::F32s {
        std::array::from_fn(|i| a[i].mul_add(b[i], acc[i]))
    }

    #[inline(always)]
    unsafe fn sum(v: Self::F32s) -> f32 {
        // AVX2's order: high half onto low half, then lanes 2-3 onto 0-1, then 1 onto 0.
        let quarter: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
        let pair = [quarter[0] + quarter[2], quarter[1] + quarter[3]];
        pair[0] + pair[1]
    }

    #[inline(always)]
    unsafe fn dequantize_chunk<F: Format>(
        block: &[u8],
        chunk: usize,
    ) -> [Self::F32s; CHUNK / LANES] {
        let params = F::params::<Self>(block, chunk);
        let q = F::values(block, chunk);
        std::array::from_fn(|v| {
            std::array::from_fn(|i| dequantize_value(q[v * LANES + i], v * LANES + i, &params))
        })
    }

    unsafe fn run<F: Format>(job: &Job, tiles: Range<usize>, panel: &mut Vec<f32>) {
        run_tiles::<F, Self>(job, tiles, panel)
    }
}
