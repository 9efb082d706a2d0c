//! SwiGLU's activation on CPU: `silu(gate) * up` of a fused gate/up projection's rows,
//! rows in parallel (candle's elementwise ops ran on one thread, in three passes).

use rayon::prelude::*;

/// Rows per task: enough work to be worth a hand-over to another thread.
const ROWS_PER_TASK: usize = 16;

/// `gate_up` `[rows, 2 * half]` (each row: `half` gate values, then `half` up values) ->
/// `[rows, half]`: `gate / (1 + exp(-gate)) * up`, element by element, rounded as candle's
/// `silu` then `*` round it (the same bits).
///
/// # Panics
/// When `gate_up` is not whole rows of `2 * half`, or `half` is 0.
pub fn silu_mul(gate_up: &[f32], half: usize) -> Vec<f32> {
    assert!(
        half > 0 && gate_up.len().is_multiple_of(2 * half),
        "{} values are not rows of 2 x {half}",
        gate_up.len()
    );
    let mut out = vec![0f32; gate_up.len() / 2];
    out.par_chunks_mut(half * ROWS_PER_TASK)
        .zip(gate_up.par_chunks(2 * half * ROWS_PER_TASK))
        .for_each(|(out, gate_up)| {
            for (out, row) in out.chunks_exact_mut(half).zip(gate_up.chunks_exact(2 * half)) {
                let (gate, up) = row.split_at(half);
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_silu_of_the_gate_times_up_per_row() {
        let (rows, half) = (ROWS_PER_TASK + 3, 5);
        let gate_up: Vec<f32> = (0..rows * 2 * half)
            .map(|i| (i as f32 * 0.37).sin() * 4.)
            .collect();
        let out = silu_mul(&gate_up, half);
        assert_eq!(out.len(), rows * half);
        for r in 0..rows {
            for i in 0..half {
                let (g, u) = (gate_up[r * 2 * half + i] as f64, gate_up[r * 2 * half + half + i] as f64);
                let want = g / (1. + (-g).exp()) * u;
                let got = out[r * half + i] as f64;
                assert!((got - want).abs() <= 1e-6 * want.abs().max(1.), "row {r} {i}: {got} vs {want}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "not rows")]
    fn rejects_partial_rows() {
        silu_mul(&[0.; 7], 2);
    }
}
