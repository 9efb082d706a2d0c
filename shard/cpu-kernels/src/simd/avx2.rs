//! AVX2 with FMA (and F16C for the blocks' scales), detected at run time; where the CPU
//! also has AVX-512 (F and VL), the same 8-lane operations compiled with its 32 vector
//! registers instead of 16, which fit larger register tiles (the same bits: only the
//! registers differ).

use super::{Simd, LANES};
use crate::blocks::{Format, HalfToF32, CHUNK};
use crate::matmul::{run_tiles, Job};
use std::arch::x86_64::*;
use std::ops::Range;

/// Whether this CPU has AVX2, FMA and F16C (detected once, then cached by std).
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Whether this CPU also has AVX-512 F and VL (32 registers for the 8-lane code).
pub(crate) fn wide_available() -> bool {
    available() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
}

/// `WIDE`: compiled with AVX-512's 32 registers (the CPU must have them).
#[derive(Clone, Copy)]
pub(crate) struct Avx2<const WIDE: bool>;

impl<const WIDE: bool> HalfToF32 for Avx2<WIDE> {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half_to_f32(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

impl<const WIDE: bool> Simd for Avx2<WIDE> {
    type F32s = __m256;
    const REGISTERS: usize = if WIDE { 32 } else { 16 };

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p.cast())
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mul_add(a: __m256, b: __m256, acc: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, acc)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum(v: __m256) -> f32 {
        let quarter = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pair = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequantize_chunk<F: Format>(block: &[u8], chunk: usize) -> [__m256; CHUNK / LANES] {
        let params = F::params::<Self>(block, chunk);
        let q = F::values_avx2_i32(block, chunk);
        let (scale, offset) = (
            params.scale.map(|s| _mm256_set1_ps(s)),
            params.offset.map(|o| _mm256_set1_ps(o)),
        );
        std::array::from_fn(|i| {
            let half = i * LANES / (CHUNK / 2);
            let q = _mm256_cvtepi32_ps(q[i]);
            _mm256_fmadd_ps(q, scale[half], offset[half])
        })
    }

    unsafe fn run<F: Format>(job: &Job, tiles: Range<usize>, panel: &mut Vec<f32>) {
        if WIDE {
            run_avx512::<F>(job, tiles, panel)
        } else {
            run_avx2::<F>(job, tiles, panel)
        }
    }
}

/// The kernel compiled for AVX2 + FMA: the generic code is inlined here, so it is.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<F: Format>(job: &Job, tiles: Range<usize>, panel: &mut Vec<f32>) {
    run_tiles::<F, Avx2<false>>(job, tiles, panel)
}

/// The same with AVX-512's registers.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn run_avx512<F: Format>(job: &Job, tiles: Range<usize>, panel: &mut Vec<f32>) {
    run_tiles::<F, Avx2<true>>(job, tiles, panel)
}
