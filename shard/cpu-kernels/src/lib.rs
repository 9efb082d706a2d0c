//! Products of f32 activations with weights kept as GGUF quantized blocks, on CPU.
//!
//! `y[rows, out] = x[rows, in] · Wᵀ`, `W` `[out, in]` as ggml stores it (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K). The activations stay f32 (they are not
//! quantized to 8 bits as ggml's and candle's kernels do): each weight block is
//! dequantized in cache and multiplied in f32, so the result is the dense product of
//! the dequantized weights up to summation order, and each row's result is the same
//! bits whatever rows are computed with it (see `matmul`). AVX2+FMA where the CPU has
//! it (compiled with AVX-512's 32 registers where it has those too: larger register
//! tiles, the same operations), the same operations in portable code otherwise;
//! threads over output features through rayon's current pool. Also decode attention over a paged KV cache, read in
//! place (`decode_attention`), and SwiGLU's `silu(gate) * up` (`silu_mul`).

mod activation;
mod attention;
mod blocks;
mod matmul;
mod simd;

pub use activation::silu_mul;
pub use attention::{decode_attention, AttentionShape};
pub use blocks::BlockFormat;

use blocks::{Format, FormatVisitor};
use std::fmt;
use std::mem::MaybeUninit;

/// A weight matrix `[out_features, in_features]` of quantized blocks, row after row.
#[derive(Clone)]
pub struct QuantMatrix {
    format: BlockFormat,
    out_features: usize,
    in_features: usize,
    blocks: Vec<u8>,
}

/// Blocks that do not make the matrix they were given as.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeError(String);

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

impl QuantMatrix {
    /// `blocks`: the rows' blocks as GGUF stores them (each row a whole number of blocks).
    pub fn new(
        format: BlockFormat,
        out_features: usize,
        in_features: usize,
        blocks: Vec<u8>,
    ) -> Result<Self, ShapeError> {
        if in_features == 0 || !in_features.is_multiple_of(format.block_elems()) {
            return Err(ShapeError(format!(
                "{in_features} input features are not whole {format:?} blocks of {}",
                format.block_elems()
            )));
        }
        let expected = out_features * in_features / format.block_elems() * format.block_bytes();
        if blocks.len() != expected {
            return Err(ShapeError(format!(
                "{} bytes for a [{out_features}, {in_features}] {format:?} matrix of {expected}",
                blocks.len()
            )));
        }
        Ok(Self {
            format,
            out_features,
            in_features,
            blocks,
        })
    }

    /// The matrices' rows one after the other (one product in place of several); None
    /// unless they share the format and the input features.
    pub fn concat_outputs(parts: &[&QuantMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.in_features != first.in_features)
        {
            return None;
        }
        Some(Self {
            format: first.format,
            out_features: parts.iter().map(|p| p.out_features).sum(),
            in_features: first.in_features,
            blocks: parts
                .iter()
                .flat_map(|p| p.blocks.iter().copied())
                .collect(),
        })
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub(crate) fn row_bytes(&self) -> usize {
        self.in_features / self.format.block_elems() * self.format.block_bytes()
    }

    /// The blocks of weight row `row`.
    fn row_blocks(&self, row: usize) -> &[u8] {
        let size = self.row_bytes();
        &self.blocks[row * size..(row + 1) * size]
    }

    /// `y = x · Wᵀ` with `x` `[rows, in_features]` and `y` `[rows, out_features]`,
    /// row-major; on rayon's current thread pool.
    ///
    /// # Panics
    /// When `x` or `y` is not of that shape.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) {
        // SAFETY: f32 and MaybeUninit<f32> share their layout, and the product only
        // writes initialised values.
        let y = unsafe { &mut *(y as *mut [f32] as *mut [MaybeUninit<f32>]) };
        self.matmul_with(Isa::detect(), x, y)
    }

    /// `matmul` into a new `[rows, out_features]` vector (not zeroed first: the
    /// product writes every element).
    ///
    /// # Panics
    /// When `x` is not `[rows, in_features]`.
    pub fn matmul_to_vec(&self, x: &[f32]) -> Vec<f32> {
        let len = x.len() / self.in_features * self.out_features;
        let mut y = Vec::with_capacity(len);
        self.matmul_with(Isa::detect(), x, &mut y.spare_capacity_mut()[..len]);
        // SAFETY: the product wrote all `len` elements (it panics otherwise).
        unsafe { y.set_len(len) };
        y
    }

    fn matmul_with(&self, isa: Isa, x: &[f32], y: &mut [MaybeUninit<f32>]) {
        let job = matmul::Job::new(self, x, y);
        self.format.with_format(RunJob { job: &job, isa });
    }
}

/// The instruction set the kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2's operations with AVX-512's 32 registers.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    Portable,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if simd::avx2::wide_available() {
            return Self::Avx512;
        }
        #[cfg(target_arch = "x86_64")]
        if simd::avx2::available() {
            return Self::Avx2;
        }
        Self::Portable
    }
}

struct RunJob<'a, 'b> {
    job: &'a matmul::Job<'b>,
    isa: Isa,
}

impl FormatVisitor for RunJob<'_, '_> {
    type Output = ();
    fn visit<F: Format>(self) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => matmul::run::<F, simd::avx2::Avx2<false>>(self.job),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => matmul::run::<F, simd::avx2::Avx2<true>>(self.job),
            Isa::Portable => matmul::run::<F, simd::portable::Portable>(self.job),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocks::tests::{dequantize_block, random_blocks, Rng};

    fn random_matrix(
        format: BlockFormat,
        out: usize,
        blocks_per_row: usize,
        rng: &mut Rng,
    ) -> QuantMatrix {
        let data = random_blocks(format, out * blocks_per_row, rng);
        QuantMatrix::new(format, out, blocks_per_row * format.block_elems(), data).unwrap()
    }

    fn dequantize(w: &QuantMatrix) -> Vec<f32> {
        w.blocks
            .chunks_exact(w.format.block_bytes())
            .flat_map(|b| dequantize_block(w.format, b))
            .collect()
    }

    /// Every instruction set this CPU has.
    fn isas() -> Vec<Isa> {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if simd::avx2::available() {
                isas.push(Isa::Avx2);
            }
            if simd::avx2::wide_available() {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }

    fn product(w: &QuantMatrix, isa: Isa, x: &[f32]) -> Vec<f32> {
        let mut y = vec![MaybeUninit::new(f32::NAN); x.len() / w.in_features * w.out_features];
        w.matmul_with(isa, x, &mut y);
        // SAFETY: initialised above (a NaN left would fail the tests).
        y.into_iter().map(|v| unsafe { v.assume_init() }).collect()
    }

    /// Every format, every instruction set: the dense product of ggml's dequantized
    /// weights, to f32 rounding (the reference sums in f64).
    #[test]
    fn every_format_matches_the_dequantized_product() {
        let mut rng = Rng(7);
        for format in BlockFormat::ALL {
            // 13 outputs: a padded last tile; 2 blocks of 256 or 9 of 32 per row.
            let blocks_per_row = if format.block_elems() == 256 { 2 } else { 9 };
            let w = random_matrix(format, 13, blocks_per_row, &mut rng);
            let (k, rows) = (w.in_features, 5);
            let x: Vec<f32> = (0..rows * k).map(|_| rng.unit()).collect();
            let dense = dequantize(&w);
            for isa in isas() {
                let y = product(&w, isa, &x);
                for r in 0..rows {
                    for o in 0..w.out_features {
                        let terms = (0..k).map(|i| x[r * k + i] as f64 * dense[o * k + i] as f64);
                        let (want, size) = terms.fold((0., 0.), |(s, a), t| (s + t, a + t.abs()));
                        let got = y[r * w.out_features + o] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * size,
                            "{format:?} {isa:?} row {r} out {o}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// A row's result is the same bits alone, among 1..=17 rows, or past a row block,
    /// on 1 or 3 threads, and with either instruction set.
    #[test]
    fn rows_are_batch_invariant() {
        let mut rng = Rng(11);
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0, BlockFormat::Q6K] {
            let w = random_matrix(format, 37, 512 / format.block_elems(), &mut rng);
            let k = w.in_features;
            let x: Vec<f32> = (0..131 * k).map(|_| rng.unit()).collect();
            let alone: Vec<Vec<f32>> = (0..131)
                .map(|r| product(&w, Isa::Portable, &x[r * k..(r + 1) * k]))
                .collect();
            for isa in isas() {
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    for rows in (1..=17).chain([131]) {
                        let y = pool.install(|| product(&w, isa, &x[..rows * k]));
                        for (r, alone) in alone.iter().enumerate().take(rows) {
                            let row = &y[r * w.out_features..(r + 1) * w.out_features];
                            assert!(
                                row.iter()
                                    .zip(alone)
                                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{format:?} {isa:?} {threads} threads: row {r} of {rows}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_to_vec_is_matmul() {
        let mut rng = Rng(13);
        let w = random_matrix(BlockFormat::Q4_1, 11, 3, &mut rng);
        let x: Vec<f32> = (0..4 * w.in_features).map(|_| rng.unit()).collect();
        let mut y = vec![0f32; 4 * w.out_features];
        w.matmul(&x, &mut y);
        assert_eq!(w.matmul_to_vec(&x), y);
    }

    #[test]
    fn concatenated_outputs_are_the_parts_products() {
        let mut rng = Rng(3);
        let a = random_matrix(BlockFormat::Q4_0, 5, 2, &mut rng);
        let b = random_matrix(BlockFormat::Q4_0, 3, 2, &mut rng);
        let x: Vec<f32> = (0..2 * 64).map(|_| rng.unit()).collect();
        let both = QuantMatrix::concat_outputs(&[&a, &b]).unwrap();
        let y = product(&both, Isa::detect(), &x);
        let (ya, yb) = (
            product(&a, Isa::detect(), &x),
            product(&b, Isa::detect(), &x),
        );
        for r in 0..2 {
            assert_eq!(&y[r * 8..r * 8 + 5], &ya[r * 5..r * 5 + 5]);
            assert_eq!(&y[r * 8 + 5..r * 8 + 8], &yb[r * 3..r * 3 + 3]);
        }
        let other = random_matrix(BlockFormat::Q8_0, 3, 2, &mut rng);
        assert!(QuantMatrix::concat_outputs(&[&a, &other]).is_none());
    }

    #[test]
    fn shapes_are_checked() {
        assert!(QuantMatrix::new(BlockFormat::Q4_0, 2, 48, vec![0; 36]).is_err());
        assert!(QuantMatrix::new(BlockFormat::Q4_0, 2, 32, vec![0; 35]).is_err());
        assert!(QuantMatrix::new(BlockFormat::Q4_0, 2, 32, vec![0; 36]).is_ok());
    }
}
