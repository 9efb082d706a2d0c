//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):
//! four random words from a counter and a key, with no state to carry. The sampler
//! keys it by the request's seed and counts by (token index, vocabulary entry), so a
//! seeded request draws the same numbers alone, in any batch, on any rank; the CUDA
//! sampler (`philox` in shard/kernels/src/cu/sampling.cu) computes the same function.

pub fn philox(counter: [u32; 4], key: u64) -> [u32; 4] {
    let mut c = counter;
    let mut k = [key as u32, (key >> 32) as u32];
    for _ in 0..10 {
        let p0 = 0xD251_1F53u64 * u64::from(c[0]);
        let p1 = 0xCD9E_8D57u64 * u64::from(c[2]);
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
        k[0] = k[0].wrapping_add(0x9E37_79B9);
        k[1] = k[1].wrapping_add(0xBB67_AE85);
    }
    c
}

/// A uniform draw in (0, 1) from the top 23 bits of a random word (with 24, the
/// largest draw would round to 1 in f32).
pub fn uniform(bits: u32) -> f32 {
    ((bits >> 9) as f32 + 0.5) * (1.0 / (1u32 << 23) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors of Random123's `kat_vectors` for philox4x32, 10 rounds.
    #[test]
    fn matches_the_reference_vectors() {
        assert_eq!(
            philox([0; 4], 0),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox([u32::MAX; 4], u64::MAX),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                0x299f_31d0_a409_3822
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn uniform_stays_inside_the_open_interval() {
        assert!(uniform(0) > 0.0);
        assert!(uniform(u32::MAX) < 1.0);
        assert!((uniform(1 << 31) - 0.5).abs() < 1e-6);
    }
}
