//! `y = x · Wᵀ` over f32 activation rows and a quantized `W`, batch-invariant by
//! construction: each `(row, output)` is one 8-lane accumulator fed by `mul_add` over
//! the 8-weight groups of the row in order, then summed across lanes in a fixed order,
//! whatever the number of rows, the tile a row falls in, or the number of threads.
//!
//! Work is split over output features only (never over the reduction): each task takes
//! a run of output tiles of `OUT_TILE` weight rows. Up to `REGISTER_ROWS` rows (decode
//! steps) each weight chunk is dequantized in registers and multiplied into every row
//! at once. More rows (prefill) dequantize a tile's rows into a small f32 panel (in L1)
//! and multiply every activation row by it, `ROW_TILE` rows at a time so that each
//! panel load serves several rows. Both dequantize with the same operations and feed
//! each accumulator in the same order, so a row gets the same bits on either path.

use crate::blocks::{Format, CHUNK};
use crate::simd::{Simd, LANES};
use crate::QuantMatrix;
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Weight rows dequantized together into the panel; a row tile of one row multiplies
/// all of them at once, eight independent accumulators to hide the latency of `mul_add`.
const OUT_TILE: usize = 8;
/// Outputs per row in a tile of several rows: `ROW_TILE * OUT_TILE_MULTI` accumulators
/// plus `ROW_TILE` activation registers fit the 16 vector registers, and
/// `WIDE_ROW_TILE` rows' the 32 of AVX-512 (fewer loads per `mul_add`).
const OUT_TILE_MULTI: usize = 4;
const ROW_TILE: usize = 3;
const WIDE_ROW_TILE: usize = 6;
/// Rows up to which each weight chunk is dequantized in registers and used by all of
/// them (a decode step's batch); more rows amortize the panel's stores and loads.
const REGISTER_ROWS: usize = 8;

/// How far ahead the register path fetches the weights, in weight rows.
const PREFETCH_ROWS: usize = 32;
const CACHE_LINE: usize = 64;
/// Rows whose activations stay in L2 while a task's tiles pass over them.
const ROW_BLOCK: usize = 128;
/// Tasks per thread for several rows: enough to even out the threads, few enough to keep
/// tasks long. A lone row takes one task per thread: each then streams one contiguous
/// run of weight rows, which its prefetches follow best (~7% faster decode).
const TASKS_PER_THREAD: usize = 4;

/// One product: the weights, the activations `[rows, in]` and the output `[rows, out]`.
pub(crate) struct Job<'a> {
    pub weight: &'a QuantMatrix,
    pub x: &'a [f32],
    pub rows: usize,
    y: *mut f32,
}

// SAFETY: tasks write disjoint columns of `y` (their own output tiles).
unsafe impl Sync for Job<'_> {}

impl<'a> Job<'a> {
    /// `y` need not be initialised: every output is written, none read.
    pub fn new(weight: &'a QuantMatrix, x: &'a [f32], y: &'a mut [MaybeUninit<f32>]) -> Self {
        let rows = x.len() / weight.in_features();
        assert_eq!(x.len(), rows * weight.in_features(), "x is not [rows, in]");
        assert_eq!(
            y.len(),
            rows * weight.out_features(),
            "y is not [rows, out]"
        );
        Self {
            weight,
            x,
            rows,
            y: y.as_mut_ptr().cast(),
        }
    }
}

/// Runs `job` on rayon's current pool with instruction set `S`.
pub(crate) fn run<F: Format, S: Simd>(job: &Job) {
    let tiles = job.weight.out_features().div_ceil(OUT_TILE);
    let tasks_per_thread = if job.rows == 1 { 1 } else { TASKS_PER_THREAD };
    let tasks = (rayon::current_num_threads() * tasks_per_thread).clamp(1, tiles.max(1));
    let per_task = tiles.div_ceil(tasks).max(1);
    (0..tiles.div_ceil(per_task))
        .into_par_iter()
        .for_each(|task| {
            let first = task * per_task;
            PANEL.with_borrow_mut(|panel| {
                // SAFETY: `S` was checked available by the caller; tasks take disjoint tiles.
                unsafe { S::run::<F>(job, first..(first + per_task).min(tiles), panel) }
            })
        });
}

thread_local! {
    /// Each thread's panel of dequantized weight rows, `[OUT_TILE, in]`.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The output tiles `tiles` of `job`, on this thread, `panel` its scratch space.
///
/// # Safety
/// `S` must be available; no other thread may write these tiles' outputs.
#[inline(always)]
pub(crate) unsafe fn run_tiles<F: Format, S: Simd>(
    job: &Job,
    tiles: Range<usize>,
    panel: &mut Vec<f32>,
) {
    if job.rows <= REGISTER_ROWS {
        for tile in tiles {
            let mut row = 0;
            while row < job.rows {
                row += register_tile::<F, S>(job, row, tile);
            }
        }
        return;
    }
    let (w, k) = (job.weight, job.weight.in_features());
    panel.resize(OUT_TILE * k, 0.);
    for row_block in (0..job.rows).step_by(ROW_BLOCK) {
        let row_end = (row_block + ROW_BLOCK).min(job.rows);
        for tile in tiles.clone() {
            let (first_out, outs) = tile_outputs(w, tile);
            for o in 0..OUT_TILE {
                let panel_row = &mut panel[o * k..(o + 1) * k];
                if o < outs {
                    dequantize_row::<F, S>(w.row_blocks(first_out + o), panel_row);
                } else {
                    // Padding, multiplied but never stored.
                    panel_row.fill(0.);
                }
            }
            let mut row = row_block;
            while row < row_end {
                let rows = match row_end - row {
                    left if S::REGISTERS >= 32 && left >= WIDE_ROW_TILE => WIDE_ROW_TILE,
                    left => ROW_TILE.min(left),
                };
                let at = |o: usize| (row, first_out + o, outs.saturating_sub(o));
                if rows == 1 {
                    tile_rows::<S, 1, OUT_TILE>(job, panel, at(0), 0);
                } else {
                    for o in (0..OUT_TILE).step_by(OUT_TILE_MULTI) {
                        match rows {
                            2 => tile_rows::<S, 2, OUT_TILE_MULTI>(job, panel, at(o), o),
                            ROW_TILE => {
                                tile_rows::<S, ROW_TILE, OUT_TILE_MULTI>(job, panel, at(o), o)
                            }
                            _ => tile_rows::<S, WIDE_ROW_TILE, OUT_TILE_MULTI>(
                                job,
                                panel,
                                at(o),
                                o,
                            ),
                        }
                    }
                }
                row += rows;
            }
        }
    }
}

/// The first output of tile `tile` and how many outputs it has (fewer in the last).
fn tile_outputs(w: &QuantMatrix, tile: usize) -> (usize, usize) {
    let first = tile * OUT_TILE;
    (first, OUT_TILE.min(w.out_features() - first))
}

#[inline(always)]
unsafe fn dequantize_row<F: Format, S: Simd>(blocks: &[u8], out: &mut [f32]) {
    let chunks = F::BLOCK_ELEMS / CHUNK;
    for (b, block) in blocks.chunks_exact(F::BLOCK_BYTES).enumerate() {
        for chunk in 0..chunks {
            let at = out[(b * chunks + chunk) * CHUNK..].as_mut_ptr();
            for (i, v) in S::dequantize_chunk::<F>(block, chunk)
                .into_iter()
                .enumerate()
            {
                S::store(at.add(i * LANES), v);
            }
        }
    }
}

/// Some of the rows from `row` (8, 4, 2 or 1 of them, as many as remain) times output
/// tile `tile`, the weights dequantized in registers rather than through the panel: the
/// same values and the same `mul_add` sequence per output as `tile_rows`, so the same
/// bits. Returns the number of rows done. A group of `R` rows and `O` outputs holds
/// `R * O` accumulators and `4 * O` weight vectors: sized to the registers (at least
/// four chains of `mul_add` hide its latency).
#[inline(always)]
unsafe fn register_tile<F: Format, S: Simd>(job: &Job, row: usize, tile: usize) -> usize {
    let (first_out, outs) = tile_outputs(job.weight, tile);
    let wide = S::REGISTERS >= 32;
    match job.rows - row {
        8.. if wide => register_groups::<F, S, 8, 2>(job, row, first_out, outs),
        8.. => register_groups::<F, S, 8, 1>(job, row, first_out, outs),
        4.. if wide => register_groups::<F, S, 4, 4>(job, row, first_out, outs),
        4.. => register_groups::<F, S, 4, 2>(job, row, first_out, outs),
        2.. => register_groups::<F, S, 2, 4>(job, row, first_out, outs),
        _ => register_groups::<F, S, 1, 4>(job, row, first_out, outs),
    }
}

/// `R` rows from `row` times outputs `first_out..+outs`, `O` at a time; returns `R`.
#[inline(always)]
unsafe fn register_groups<F: Format, S: Simd, const R: usize, const O: usize>(
    job: &Job,
    row: usize,
    first_out: usize,
    outs: usize,
) -> usize {
    for o in (0..outs).step_by(O) {
        register_group::<F, S, R, O>(job, (row, first_out + o, outs - o));
    }
    R
}

/// `R` rows from `row` times weight rows `first_out..+O`, stored to outputs
/// `first_out..+min(O, outs)`.
#[inline(always)]
unsafe fn register_group<F: Format, S: Simd, const R: usize, const O: usize>(
    job: &Job,
    (row, first_out, outs): (usize, usize, usize),
) {
    let w = job.weight;
    let (k, out) = (w.in_features(), w.out_features());
    // Past the last output, repeat it: computed, never stored.
    let weights: [*const u8; O] =
        std::array::from_fn(|o| w.row_blocks(first_out + o.min(outs - 1)).as_ptr());
    let x: [*const f32; R] = std::array::from_fn(|r| job.x.as_ptr().add((row + r) * k));
    let mut acc = [[S::zero(); O]; R];
    let chunks = F::BLOCK_ELEMS / CHUNK;
    // The group's weight rows are consecutive in memory, and so are the next groups':
    // while this group's blocks are multiplied, the weights `PREFETCH_ROWS` rows on are
    // fetched, as fast as they are used (with the hardware's prefetcher alone, a lone row
    // waited on memory half the time).
    let ahead = weights[0].wrapping_add(PREFETCH_ROWS * w.row_bytes());
    let step_bytes = O * F::BLOCK_BYTES;
    for b in 0..k / F::BLOCK_ELEMS {
        for line in (0..step_bytes).step_by(CACHE_LINE) {
            S::prefetch(ahead.wrapping_add(b * step_bytes + line));
        }
        for chunk in 0..chunks {
            let at = (b * chunks + chunk) * CHUNK;
            let by_output: [_; O] = std::array::from_fn(|o| {
                let block =
                    std::slice::from_raw_parts(weights[o].add(b * F::BLOCK_BYTES), F::BLOCK_BYTES);
                S::dequantize_chunk::<F>(block, chunk)
            });
            // `ws[i][o]`: vector `i` of the chunk of output `o`.
            let ws: [[S::F32s; O]; CHUNK / LANES] =
                std::array::from_fn(|i| std::array::from_fn(|o| by_output[o][i]));
            // Each activation vector loaded once for the group's outputs.
            for (i, ws) in ws.iter().enumerate() {
                for r in 0..R {
                    let xs = S::load(x[r].add(at + i * LANES));
                    for (o, &w) in ws.iter().enumerate() {
                        acc[r][o] = S::mul_add(xs, w, acc[r][o]);
                    }
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let y = job.y.add((row + r) * out + first_out);
        for (o, &acc) in acc.iter().enumerate().take(outs.min(O)) {
            *y.add(o) = S::sum(acc);
        }
    }
}

/// `R` rows from `row` times panel rows `panel_first..+O`, stored to outputs
/// `first_out..+stored` (`stored` may be less than `O`, or 0, at the padded end).
#[inline(always)]
unsafe fn tile_rows<S: Simd, const R: usize, const O: usize>(
    job: &Job,
    panel: &[f32],
    (row, first_out, stored): (usize, usize, usize),
    panel_first: usize,
) {
    let (k, out) = (job.weight.in_features(), job.weight.out_features());
    let x: [*const f32; R] = std::array::from_fn(|r| job.x[(row + r) * k..].as_ptr());
    let w: [*const f32; O] = std::array::from_fn(|o| panel[(panel_first + o) * k..].as_ptr());
    let mut acc = [[S::zero(); O]; R];
    for group in (0..k).step_by(LANES) {
        let xs: [S::F32s; R] = std::array::from_fn(|r| S::load(x[r].add(group)));
        for o in 0..O {
            let ws = S::load(w[o].add(group));
            for r in 0..R {
                acc[r][o] = S::mul_add(xs[r], ws, acc[r][o]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let y = job.y.add((row + r) * out + first_out);
        for (o, &acc) in acc.iter().enumerate().take(stored.min(O)) {
            *y.add(o) = S::sum(acc);
        }
    }
}
