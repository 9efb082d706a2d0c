//! The GGUF block formats, as ggml lays them out: each format says where a block keeps
//! its scales and quantized values, and unpacks one chunk of 32 consecutive weights at a
//! time (portably, and with AVX2 where that pays).
//!
//! A chunk's weights are `q * scale + offset`, `q` a signed byte, `scale` and `offset`
//! constant over each half of 16 weights (Q6_K changes its scale every 16 weights).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Weights per chunk: the unit every format unpacks.
pub const CHUNK: usize = 32;

/// The weight formats the kernels multiply by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockFormat {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl BlockFormat {
    pub const ALL: [BlockFormat; 10] = [
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// Weights per block.
    pub fn block_elems(self) -> usize {
        self.with_format(FormatInfo).0
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.with_format(FormatInfo).1
    }

    /// Calls `f` with the format's type, so generic code is monomorphised per format.
    pub(crate) fn with_format<V: FormatVisitor>(self, f: V) -> V::Output {
        match self {
            Self::Q4_0 => f.visit::<Q4_0>(),
            Self::Q4_1 => f.visit::<Q4_1>(),
            Self::Q5_0 => f.visit::<Q5_0>(),
            Self::Q5_1 => f.visit::<Q5_1>(),
            Self::Q8_0 => f.visit::<Q8_0>(),
            Self::Q2K => f.visit::<Q2K>(),
            Self::Q3K => f.visit::<Q3K>(),
            Self::Q4K => f.visit::<Q4K>(),
            Self::Q5K => f.visit::<Q5K>(),
            Self::Q6K => f.visit::<Q6K>(),
        }
    }
}

/// Generic code to run for a format known only at run time.
pub(crate) trait FormatVisitor {
    type Output;
    fn visit<F: Format>(self) -> Self::Output;
}

struct FormatInfo;

impl FormatVisitor for FormatInfo {
    type Output = (usize, usize);
    fn visit<F: Format>(self) -> (usize, usize) {
        (F::BLOCK_ELEMS, F::BLOCK_BYTES)
    }
}

/// `q * scale[h] + offset[h]` for the weights of half `h` (0: the chunk's first 16).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ChunkParams {
    pub scale: [f32; 2],
    pub offset: [f32; 2],
}

impl ChunkParams {
    fn uniform(scale: f32, offset: f32) -> Self {
        Self {
            scale: [scale; 2],
            offset: [offset; 2],
        }
    }
}

/// One block format. `block` is always `BLOCK_BYTES` long and `chunk < BLOCK_ELEMS / 32`.
pub(crate) trait Format {
    const BLOCK_ELEMS: usize;
    const BLOCK_BYTES: usize;
    /// The chunk's scales and offsets, the f16 fields converted by `H`.
    ///
    /// # Safety
    /// `H` must be available.
    unsafe fn params<H: HalfToF32>(block: &[u8], chunk: usize) -> ChunkParams;
    /// The chunk's 32 quantized values, in weight order.
    fn values(block: &[u8], chunk: usize) -> [i8; CHUNK];
    /// `values` in a register.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2(block: &[u8], chunk: usize) -> __m256i {
        let values = Self::values(block, chunk);
        _mm256_loadu_si256(values.as_ptr().cast())
    }
    /// `values` widened to 32 bits, 8 to a register, in order: formats whose values
    /// sit in whole bytes, or nibbles, are widened straight from memory.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2_i32(block: &[u8], chunk: usize) -> [__m256i; CHUNK / 8] {
        let q = Self::values_avx2(block, chunk);
        let (low, high) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
        [
            low,
            _mm_srli_si128::<8>(low),
            high,
            _mm_srli_si128::<8>(high),
        ]
        .map(|eighth| _mm256_cvtepi8_epi32(eighth))
    }
}

/// An instruction set's conversion of IEEE halves (the blocks' scales) to f32.
pub(crate) trait HalfToF32 {
    /// # Safety
    /// The instruction set must be available.
    unsafe fn half_to_f32(bits: u16) -> f32;
}

#[inline(always)]
unsafe fn f16_at<H: HalfToF32>(block: &[u8], at: usize) -> f32 {
    H::half_to_f32(u16::from_le_bytes([block[at], block[at + 1]]))
}

/// IEEE half to single precision, exactly, without branches (a call per block would
/// cost more than the block's arithmetic): the half's exponent
/// and mantissa bits moved into place, rescaled by 2^112 (the difference of the
/// exponent biases, exact also for subnormals), infinities and NaNs kept as such.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let magnitude = ((h & 0x7fff) as u32) << 13;
    let scaled = f32::from_bits(magnitude) * f32::from_bits(0x7780_0000);
    let not_finite = (h & 0x7c00) == 0x7c00;
    let bits = if not_finite {
        magnitude | 0x7f80_0000
    } else {
        scaled.to_bits()
    };
    f32::from_bits(bits | (((h & 0x8000) as u32) << 16))
}

fn u32_at(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"))
}

/// 16 bytes of packed nibbles: the low nibbles are weights 0..16, the high ones 16..32.
fn nibbles_split(qs: &[u8]) -> [u8; CHUNK] {
    std::array::from_fn(|i| if i < 16 { qs[i] & 0xF } else { qs[i - 16] >> 4 })
}

/// `nibbles_split` in a register.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles_split_avx2(qs: &[u8]) -> __m256i {
    debug_assert!(qs.len() >= 16);
    let packed = _mm_loadu_si128(qs.as_ptr().cast());
    let mask = _mm_set1_epi8(0xF);
    let low = _mm_and_si128(packed, mask);
    let high = _mm_and_si128(_mm_srli_epi16::<4>(packed), mask);
    _mm256_set_m128i(high, low)
}

/// `nibbles_split` widened to 32 bits from memory (`Format::values_avx2_i32`).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles_split_avx2_i32(qs: &[u8]) -> [__m256i; CHUNK / 8] {
    debug_assert!(qs.len() >= 16);
    let widen = |at: usize| _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs[at..].as_ptr().cast()));
    let (first, second) = (widen(0), widen(8));
    let mask = _mm256_set1_epi32(0xF);
    [
        _mm256_and_si256(first, mask),
        _mm256_and_si256(second, mask),
        _mm256_srli_epi32::<4>(first),
        _mm256_srli_epi32::<4>(second),
    ]
}

/// Bit `i` of `bits` as bit 4 of byte `i` (the fifth bit of Q5_0/Q5_1 weights).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn fifth_bits_avx2(bits: u32) -> __m256i {
    // Byte i takes byte i / 8 of `bits`, then keeps bit i % 8 of it (llama.cpp's trick).
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        ),
    );
    let others_set = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    let is_set = _mm256_cmpeq_epi8(others_set, _mm256_set1_epi64x(-1));
    _mm256_and_si256(is_set, _mm256_set1_epi8(0x10))
}

/// The low (`high == false`) or high nibbles of 32 bytes, in a register.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles_avx2(bytes: &[u8], high: bool) -> __m256i {
    debug_assert!(bytes.len() >= 32);
    let v = _mm256_loadu_si256(bytes.as_ptr().cast());
    let v = if high { _mm256_srli_epi16::<4>(v) } else { v };
    _mm256_and_si256(v, _mm256_set1_epi8(0xF))
}

/// `(bytes >> shift) & mask` per byte of 32 bytes, in a register.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bit_field_avx2(bytes: &[u8], shift: usize, mask: i8) -> __m256i {
    debug_assert!(bytes.len() >= 32);
    let v = _mm256_loadu_si256(bytes.as_ptr().cast());
    let shifted = _mm256_srl_epi16(v, _mm_cvtsi32_si128(shift as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi8(mask))
}

fn to_i8<const N: usize>(values: [u8; N], minus: u8) -> [i8; N] {
    values.map(|v| v.wrapping_sub(minus) as i8)
}

/// Q4_0: `d: f16, qs: [u8; 16]`; `w = (q - 8) * d`, computed as `q * d - 8d` (the same
/// value: `8d` is exact and the multiply-add rounds once).
pub(crate) struct Q4_0;

impl Format for Q4_0 {
    const BLOCK_ELEMS: usize = 32;
    const BLOCK_BYTES: usize = 18;
    #[inline(always)]
    unsafe fn params<H: HalfToF32>(block: &[u8], _: usize) -> ChunkParams {
        let d = f16_at::<H>(block, 0);
        ChunkParams::uniform(d, -8. * d)
    }
    fn values(block: &[u8], _: usize) -> [i8; CHUNK] {
        to_i8(nibbles_split(&block[2..]), 0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2(block: &[u8], _: usize) -> __m256i {
        nibbles_split_avx2(&block[2..])
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2_i32(block: &[u8], _: usize) -> [__m256i; CHUNK / 8] {
        nibbles_split_avx2_i32(&block[2..])
    }
}

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]`; `w = q * d + m`.
pub(crate) struct Q4_1;

impl Format for Q4_1 {
    const BLOCK_ELEMS: usize = 32;
    const BLOCK_BYTES: usize = 20;
    #[inline(always)]
    unsafe fn params<H: HalfToF32>(block: &[u8], _: usize) -> ChunkParams {
        ChunkParams::uniform(f16_at::<H>(block, 0), f16_at::<H>(block, 2))
    }
    fn values(block: &[u8], _: usize) -> [i8; CHUNK] {
        to_i8(nibbles_split(&block[4..]), 0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2(block: &[u8], _: usize) -> __m256i {
        nibbles_split_avx2(&block[4..])
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2_i32(block: &[u8], _: usize) -> [__m256i; CHUNK / 8] {
        nibbles_split_avx2_i32(&block[4..])
    }
}

/// The 5-bit values of Q5_0 (at `qh`, `qs`), bit 4 of weight `i` being bit `i` of `qh`.
fn q5_values(block: &[u8], qh: usize, qs: usize, minus: u8) -> [i8; CHUNK] {
    let high = u32_at(block, qh);
    let low = nibbles_split(&block[qs..]);
    to_i8(
        std::array::from_fn(|i| low[i] | ((((high >> i) & 1) as u8) << 4)),
        minus,
    )
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q5_values_avx2(block: &[u8], qh: usize, qs: usize) -> __m256i {
    _mm256_or_si256(
        nibbles_split_avx2(&block[qs..]),
        fifth_bits_avx2(u32_at(block, qh)),
    )
}

/// Q5_0: `d: f16, qh: [u8; 4], qs: [u8; 16]`; `w = (q - 16) * d`.
pub(crate) struct Q5_0;

impl Format for Q5_0 {
    const BLOCK_ELEMS: usize = 32;
    const BLOCK_BYTES: usize = 22;
    #[inline(always)]
    unsafe fn params<H: HalfToF32>(block: &[u8], _: usize) -> ChunkParams {
        ChunkParams::uniform(f16_at::<H>(block, 0), 0.)
    }
    fn values(block: &[u8], _: usize) -> [i8; CHUNK] {
        q5_values(block, 2, 6, 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2(block: &[u8], _: usize) -> __m256i {
        _mm256_sub_epi8(q5_values_avx2(block, 2, 6), _mm256_set1_epi8(16))
    }
}

/// Q5_1: `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`; `w = q * d + m`.
pub(crate) struct Q5_1;

impl Format for Q5_1 {
    const BLOCK_ELEMS: usize = 32;
    const BLOCK_BYTES: usize = 24;
    #[inline(always)]
    unsafe fn params<H: HalfToF32>(block: &[u8], _: usize) -> ChunkParams {
        ChunkParams::uniform(f16_at::<H>(block, 0), f16_at::<H>(block, 2))
    }
    fn values(block: &[u8], _: usize) -> [i8; CHUNK] {
        q5_values(block, 4, 8, 0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2(block: &[u8], _: usize) -> __m256i {
        q5_values_avx2(block, 4, 8)
    }
}

/// Q8_0: `d: f16, qs: [i8; 32]`; `w = q * d`.
pub(crate) struct Q8_0;

impl Format for Q8_0 {
    const BLOCK_ELEMS: usize = 32;
    const BLOCK_BYTES: usize = 34;
    #[inline(always)]
    unsafe fn params<H: HalfToF32>(block: &[u8], _: usize) -> ChunkParams {
        ChunkParams::uniform(f16_at::<H>(block, 0), 0.)
    }
    fn values(block: &[u8], _: usize) -> [i8; CHUNK] {
        std::array::from_fn(|i| block[2 + i] as i8)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2(block: &[u8], _: usize) -> __m256i {
        _mm256_loadu_si256(block[2..34].as_ptr().cast())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2_i32(block: &[u8], _: usize) -> [__m256i; CHUNK / 8] {
        std::array::from_fn(|i| {
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(block[2 + 8 * i..].as_ptr().cast()))
        })
    }
}

/// Q2_K and Q3_K: 2 bits per weight at `qs` (64 bytes), chunk `c` of half `c / 4`
/// taking bits `2 (c % 4)` of the half's 32 bytes; one scale per 16 weights, the `2c`-th
/// and `2c + 1`-th. Few files use them: the AVX2 path unpacks them portably.
fn two_bit_values(block: &[u8], qs: usize, chunk: usize) -> [u8; CHUNK] {
    let bytes = &block[qs + CHUNK * (chunk / 4)..];
    std::array::from_fn(|i| (bytes[i] >> (2 * (chunk % 4))) & 3)
}

/// Q2_K: `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`; scale byte `s` gives
/// `w = q * (d * (s & 15)) - dmin * (s >> 4)`.
pub(crate) struct Q2K;

impl Format for Q2K {
    const BLOCK_ELEMS: usize = 256;
    const BLOCK_BYTES: usize = 84;
    #[inline(always)]
    unsafe fn params<H: HalfToF32>(block: &[u8], chunk: usize) -> ChunkParams {
        let (d, min) = (f16_at::<H>(block, 80), f16_at::<H>(block, 82));
        let scale = |h: usize| block[2 * chunk + h];
        ChunkParams {
            scale: [0, 1].map(|h| d * (scale(h) & 0xF) as f32),
            offset: [0, 1].map(|h| -(min * (scale(h) >> 4) as f32)),
        }
    }
    fn values(block: &[u8], chunk: usize) -> [i8; CHUNK] {
        to_i8(two_bit_values(block, 16, chunk), 0)
    }
}

/// Q3_K: `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`; a weight is its two
/// bits less 4 unless its bit `c` of `hmask` is set; `w = q * d * (scale - 32)`, the 16
/// 6-bit scales packed as ggml's `dequantize_row_q3_K` unpacks them.
pub(crate) struct Q3K;

impl Q3K {
    fn scales(packed: &[u8]) -> [i8; 16] {
        const LOW: u32 = 0x0f0f0f0f;
        const HIGH: u32 = 0x03030303;
        let word = |i: usize| u32_at(packed, 4 * i);
        let (a, b, tmp) = (word(0), word(1), word(2));
        let words = [
            (a & LOW) | ((tmp & HIGH) << 4),
            (b & LOW) | (((tmp >> 2) & HIGH) << 4),
            ((a >> 4) & LOW) | (((tmp >> 4) & HIGH) << 4),
            ((b >> 4) & LOW) | (((tmp >> 6) & HIGH) << 4),
        ];
        std::array::from_fn(|i| words[i / 4].to_le_bytes()[i % 4] as i8)
    }
}

impl Format for Q3K {
    const BLOCK_ELEMS: usize = 256;
    const BLOCK_BYTES: usize = 110;
    #[inline(always)]
    unsafe fn params<H: HalfToF32>(block: &[u8], chunk: usize) -> ChunkParams {
        let (d, scales) = (f16_at::<H>(block, 108), Self::scales(&block[96..108]));
        ChunkParams {
            scale: [0, 1].map(|h| d * (scales[2 * chunk + h] as f32 - 32.)),
            offset: [0.; 2],
        }
    }
    fn values(block: &[u8], chunk: usize) -> [i8; CHUNK] {
        let low = two_bit_values(block, 32, chunk);
        std::array::from_fn(|i| low[i] as i8 - if block[i] & (1 << chunk) != 0 { 0 } else { 4 })
    }
}

/// The 6-bit scale and min of sub-block `j` of Q4_K/Q5_K (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, scales: &[u8]) -> (f32, f32) {
    let (scale, min) = if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    };
    (scale as f32, min as f32)
}

/// Q4_K and Q5_K: `d: f16, dmin: f16, scales: [u8; 12]` first; sub-block `j` of 32
/// weights is `w = q * (d * scale_j) - dmin * min_j`.
#[inline(always)]
unsafe fn k4_params<H: HalfToF32>(block: &[u8], chunk: usize) -> ChunkParams {
    let (scale, min) = scale_min_k4(chunk, &block[4..16]);
    ChunkParams::uniform(
        f16_at::<H>(block, 0) * scale,
        -(f16_at::<H>(block, 2) * min),
    )
}

/// The low nibbles of 32 bytes are sub-block `2g`, the high ones `2g + 1`.
fn k_nibbles(qs: &[u8], chunk: usize) -> [u8; CHUNK] {
    let bytes = &qs[CHUNK * (chunk / 2)..];
    let shift = 4 * (chunk % 2);
    std::array::from_fn(|i| (bytes[i] >> shift) & 0xF)
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn k_nibbles_avx2(qs: &[u8], chunk: usize) -> __m256i {
    nibbles_avx2(&qs[CHUNK * (chunk / 2)..], chunk % 2 == 1)
}

/// Q4_K: `d, dmin, scales: [u8; 12], qs: [u8; 128]`.
pub(crate) struct Q4K;

impl Format for Q4K {
    const BLOCK_ELEMS: usize = 256;
    const BLOCK_BYTES: usize = 144;
    #[inline(always)]
    unsafe fn params<H: HalfToF32>(block: &[u8], chunk: usize) -> ChunkParams {
        k4_params::<H>(block, chunk)
    }
    fn values(block: &[u8], chunk: usize) -> [i8; CHUNK] {
        to_i8(k_nibbles(&block[16..], chunk), 0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2(block: &[u8], chunk: usize) -> __m256i {
        k_nibbles_avx2(&block[16..], chunk)
    }
}

/// Q5_K: `d, dmin, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`; bit 4 of weight `i`
/// of sub-block `j` is bit `j` of `qh[i]`.
pub(crate) struct Q5K;

impl Format for Q5K {
    const BLOCK_ELEMS: usize = 256;
    const BLOCK_BYTES: usize = 176;
    #[inline(always)]
    unsafe fn params<H: HalfToF32>(block: &[u8], chunk: usize) -> ChunkParams {
        k4_params::<H>(block, chunk)
    }
    fn values(block: &[u8], chunk: usize) -> [i8; CHUNK] {
        let low = k_nibbles(&block[48..], chunk);
        let qh = &block[16..48];
        to_i8(
            std::array::from_fn(|i| low[i] | (((qh[i] >> chunk) & 1) << 4)),
            0,
        )
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2(block: &[u8], chunk: usize) -> __m256i {
        let high = bit_field_avx2(&block[16..48], chunk, 1);
        _mm256_or_si256(
            k_nibbles_avx2(&block[48..], chunk),
            _mm256_slli_epi16::<4>(high),
        )
    }
}

/// Q6_K: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`, in two halves of 128
/// weights; chunk `k` of half `n` takes nibble `k / 2` of `ql[64n + 32 (k % 2) ..]` and
/// bits `2k, 2k + 1` of `qh[32n ..]`; `w = (q - 32) * (d * scale)`, one scale per 16.
pub(crate) struct Q6K;

impl Q6K {
    fn low_bytes(block: &[u8], chunk: usize) -> &[u8] {
        let (half, k) = (chunk / 4, chunk % 4);
        &block[64 * half + CHUNK * (k % 2)..]
    }
    fn high_bytes(block: &[u8], chunk: usize) -> &[u8] {
        &block[128 + CHUNK * (chunk / 4)..]
    }
}

impl Format for Q6K {
    const BLOCK_ELEMS: usize = 256;
    const BLOCK_BYTES: usize = 210;
    #[inline(always)]
    unsafe fn params<H: HalfToF32>(block: &[u8], chunk: usize) -> ChunkParams {
        let d = f16_at::<H>(block, 208);
        let (half, k) = (chunk / 4, chunk % 4);
        let scale = |h: usize| d * (block[192 + 8 * half + 2 * k + h] as i8) as f32;
        ChunkParams {
            scale: [scale(0), scale(1)],
            offset: [0.; 2],
        }
    }
    fn values(block: &[u8], chunk: usize) -> [i8; CHUNK] {
        let (low, high) = (
            Self::low_bytes(block, chunk),
            Self::high_bytes(block, chunk),
        );
        let (low_shift, high_shift) = (4 * ((chunk % 4) / 2), 2 * (chunk % 4));
        to_i8(
            std::array::from_fn(|i| {
                ((low[i] >> low_shift) & 0xF) | (((high[i] >> high_shift) & 3) << 4)
            }),
            32,
        )
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values_avx2(block: &[u8], chunk: usize) -> __m256i {
        let low = nibbles_avx2(Self::low_bytes(block, chunk), (chunk % 4) >= 2);
        let high = bit_field_avx2(Self::high_bytes(block, chunk), 2 * (chunk % 4), 3);
        let q = _mm256_or_si256(low, _mm256_slli_epi16::<4>(high));
        _mm256_sub_epi8(q, _mm256_set1_epi8(32))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::simd::portable::Portable;
    use half::f16;

    #[test]
    fn every_half_converts_as_the_half_crate_does() {
        for h in 0..=u16::MAX {
            let (ours, theirs) = (f16_to_f32(h), f16::from_bits(h).to_f32());
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{h:#06x}: {ours} vs {theirs}"
            );
        }
    }

    /// A deterministic xorshift generator: the tests need no `rand`.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Uniform in [-1, 1).
        pub fn unit(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.
        }
    }

    /// Byte offsets of each format's f16 fields (scales, mins).
    fn f16_fields(format: BlockFormat) -> &'static [usize] {
        match format {
            BlockFormat::Q4_0 | BlockFormat::Q5_0 | BlockFormat::Q8_0 => &[0],
            BlockFormat::Q4_1 | BlockFormat::Q5_1 | BlockFormat::Q4K | BlockFormat::Q5K => &[0, 2],
            BlockFormat::Q2K => &[80, 82],
            BlockFormat::Q3K => &[108],
            BlockFormat::Q6K => &[208],
        }
    }

    /// `blocks` random blocks: random quantized bytes, finite small f16 scales.
    pub fn random_blocks(format: BlockFormat, blocks: usize, rng: &mut Rng) -> Vec<u8> {
        let size = format.block_bytes();
        let mut data: Vec<u8> = (0..blocks * size).map(|_| rng.next_u64() as u8).collect();
        for block in data.chunks_exact_mut(size) {
            for &at in f16_fields(format) {
                let scale = f16::from_f32(rng.unit() / 16.);
                block[at..at + 2].copy_from_slice(&scale.to_le_bytes());
            }
        }
        data
    }

    /// ggml's `dequantize_row_*` for one block, transcribed independently of the chunks.
    pub fn dequantize_block(format: BlockFormat, b: &[u8]) -> Vec<f32> {
        let h = |at: usize| f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]));
        let mut y = vec![0f32; format.block_elems()];
        match format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let (qs, m, minus) = match format {
                    BlockFormat::Q4_0 => (&b[2..18], 0., 8),
                    _ => (&b[4..20], h(2), 0),
                };
                for j in 0..16 {
                    y[j] = ((qs[j] & 0xF) as i32 - minus) as f32 * h(0) + m;
                    y[j + 16] = ((qs[j] >> 4) as i32 - minus) as f32 * h(0) + m;
                }
            }
            BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
                let (qh, qs, m, minus) = match format {
                    BlockFormat::Q5_0 => (u32_at(b, 2), &b[6..22], 0., 16),
                    _ => (u32_at(b, 4), &b[8..24], h(2), 0),
                };
                for j in 0..16 {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    y[j] = (((qs[j] & 0xF) as u32 | h0) as i32 - minus) as f32 * h(0) + m;
                    y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - minus) as f32 * h(0) + m;
                }
            }
            BlockFormat::Q8_0 => {
                for j in 0..32 {
                    y[j] = b[2 + j] as i8 as f32 * h(0);
                }
            }
            BlockFormat::Q2K => {
                let (d, min, q) = (h(80), h(82), &b[16..80]);
                let mut is = 0;
                for n in 0..2 {
                    for j in 0..4 {
                        for part in 0..2 {
                            let sc = b[is];
                            is += 1;
                            let (dl, ml) = (d * (sc & 0xF) as f32, min * (sc >> 4) as f32);
                            for l in 0..16 {
                                let q = (q[32 * n + 16 * part + l] >> (2 * j)) & 3;
                                y[128 * n + 32 * j + 16 * part + l] = dl * q as f32 - ml;
                            }
                        }
                    }
                }
            }
            BlockFormat::Q3K => {
                let (hmask, q, d) = (&b[0..32], &b[32..96], h(108));
                let scales = Q3K::scales(&b[96..108]);
                let (mut is, mut m) = (0, 1u8);
                for n in 0..2 {
                    for j in 0..4 {
                        for part in 0..2 {
                            let dl = d * (scales[is] as f32 - 32.);
                            is += 1;
                            for l in 16 * part..16 * part + 16 {
                                let low = ((q[32 * n + l] >> (2 * j)) & 3) as i32;
                                let high = if hmask[l] & m != 0 { 0 } else { 4 };
                                y[128 * n + 32 * j + l] = dl * (low - high) as f32;
                            }
                        }
                        m = m.wrapping_shl(1);
                    }
                }
            }
            BlockFormat::Q4K | BlockFormat::Q5K => {
                let (d, min) = (h(0), h(2));
                let (qh, ql) = (
                    &b[16..48],
                    if format == BlockFormat::Q4K {
                        &b[16..]
                    } else {
                        &b[48..]
                    },
                );
                for group in 0..4 {
                    for sub in 0..2 {
                        let j = 2 * group + sub;
                        let (sc, m) = scale_min_k4(j, &b[4..16]);
                        for l in 0..32 {
                            let mut q = (ql[32 * group + l] >> (4 * sub)) & 0xF;
                            if format == BlockFormat::Q5K && qh[l] & (1 << j) != 0 {
                                q += 16;
                            }
                            y[32 * j + l] = d * sc * q as f32 - min * m;
                        }
                    }
                }
            }
            BlockFormat::Q6K => {
                let d = h(208);
                for n in 0..2 {
                    let (ql, qh, sc) = (&b[64 * n..], &b[128 + 32 * n..], &b[192 + 8 * n..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q = [
                            (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                            (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                        ];
                        for (k, q) in q.into_iter().enumerate() {
                            let scale = sc[is + 2 * k] as i8 as f32;
                            y[128 * n + 32 * k + l] = d * scale * (q as i32 - 32) as f32;
                        }
                    }
                }
            }
        }
        y
    }

    /// Every chunk's `q * scale + offset` is ggml's dequantized weight, and the AVX2
    /// unpacking gives the portable values.
    #[test]
    fn chunks_match_ggml_dequantization() {
        let mut rng = Rng(0x9E3779B97F4A7C15);
        for format in BlockFormat::ALL {
            for block in random_blocks(format, 64, &mut rng).chunks_exact(format.block_bytes()) {
                let expected = dequantize_block(format, block);
                format.with_format(CheckChunks {
                    block,
                    expected: &expected,
                });
            }
        }
    }

    struct CheckChunks<'a> {
        block: &'a [u8],
        expected: &'a [f32],
    }

    impl FormatVisitor for CheckChunks<'_> {
        type Output = ();
        fn visit<F: Format>(self) {
            for chunk in 0..F::BLOCK_ELEMS / CHUNK {
                // SAFETY: the portable conversion runs anywhere.
                let params = unsafe { F::params::<Portable>(self.block, chunk) };
                let values = F::values(self.block, chunk);
                for (i, &q) in values.iter().enumerate() {
                    let w = (q as f32).mul_add(params.scale[i / 16], params.offset[i / 16]);
                    let want = self.expected[CHUNK * chunk + i];
                    assert!(
                        (w - want).abs() <= 1e-6 * want.abs().max(1e-3),
                        "{}: chunk {chunk} weight {i}: {w} vs {want}",
                        std::any::type_name::<F>()
                    );
                }
                #[cfg(target_arch = "x86_64")]
                if crate::simd::avx2::available() {
                    use crate::simd::avx2::Avx2;
                    let mut simd = [0i8; CHUNK];
                    let mut widened = [0i32; CHUNK];
                    // SAFETY: AVX2 is available; the stores are of 32 bytes into 32.
                    let simd_params = unsafe {
                        let v = F::values_avx2(self.block, chunk);
                        _mm256_storeu_si256(simd.as_mut_ptr().cast(), v);
                        for (i, v) in F::values_avx2_i32(self.block, chunk)
                            .into_iter()
                            .enumerate()
                        {
                            _mm256_storeu_si256(widened[8 * i..].as_mut_ptr().cast(), v);
                        }
                        F::params::<Avx2<false>>(self.block, chunk)
                    };
                    assert_eq!(simd, values, "{} chunk {chunk}", std::any::type_name::<F>());
                    assert_eq!(
                        widened,
                        values.map(i32::from),
                        "{} chunk {chunk}",
                        std::any::type_name::<F>()
                    );
                    assert_eq!(
                        simd_params,
                        params,
                        "{} chunk {chunk}",
                        std::any::type_name::<F>()
                    );
                }
            }
        }
    }
}
