//! `y = x · Wᵀ` over f32 activation rows and a quantized `W`, batch-invariant by
//! construction: each `(row, output)` is one 8-lane accumulator fed by `mul_add` over
//! the 8-weight groups of the row in order, then summed across lanes in a fixed order,
//! whatever the number of rows, the tile a row falls in, or the number of threads.
//!
//! Work is split over output features only (never over the reduction): each task takes
//! a run of output tiles of `OUT_TILE` weight rows, dequantizes a tile's rows into a
//! small f32 panel (in L1), and multiplies every activation row by it, `ROW_TILE` rows
//! at a time so that each panel load serves several rows. A lone row (a decode step at
//! batch 1) skips the panel: each weight chunk is dequantized in registers and used
//! once, by the same operations, so its bits are those it gets in a batch.

use crate::blocks::{Format, CHUNK};
use crate::simd::{Simd, LANES};
use crate::QuantMatrix;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;

/// Weight rows dequantized together into the panel; a row tile of one row multiplies
/// all of them at once, eight independent accumulators to hide the latency of `mul_add`.
const OUT_TILE: usize = 8;
/// Outputs per row in a tile of several rows: `ROW_TILE * OUT_TILE_MULTI` accumulators
/// plus `ROW_TILE` activation registers fit the 16 vector registers.
const OUT_TILE_MULTI: usize = 4;
const ROW_TILE: usize = 3;
/// Outputs reduced side by side for a lone row: four chains of `mul_add` hide its
/// latency and leave registers for the dequantization (more spill the accumulators).
const SINGLE_ROW_GROUP: usize = 4;

/// How far ahead a lone row's product fetches the weights, in groups of rows.
const PREFETCH_GROUPS: usize = 8;
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
    pub fn new(weight: &'a QuantMatrix, x: &'a [f32], y: &'a mut [f32]) -> Self {
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
            y: y.as_mut_ptr(),
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
    if job.rows == 1 {
        for tile in tiles {
            single_row_tile::<F, S>(job, tile);
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
                let rows = ROW_TILE.min(row_end - row);
                let at = |o: usize| (row, first_out + o, outs.saturating_sub(o));
                if rows == 1 {
                    tile_rows::<S, 1, OUT_TILE>(job, panel, at(0), 0);
                } else {
                    for o in (0..OUT_TILE).step_by(OUT_TILE_MULTI) {
                        match rows {
                            2 => tile_rows::<S, 2, OUT_TILE_MULTI>(job, panel, at(o), o),
                            _ => tile_rows::<S, ROW_TILE, OUT_TILE_MULTI>(job, panel, at(o), o),
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

/// A lone row (a decode step) times one output tile, the weights dequantized in
/// registers rather than through the panel: the same values and the same `mul_add`
/// sequence per output as `tile_rows`, so the same bits.
#[inline(always)]
unsafe fn single_row_tile<F: Format, S: Simd>(job: &Job, tile: usize) {
    let (first_out, outs) = tile_outputs(job.weight, tile);
    for o in (0..outs).step_by(SINGLE_ROW_GROUP) {
        single_row_group::<F, S>(job, first_out + o, SINGLE_ROW_GROUP.min(outs - o));
    }
}

#[inline(always)]
unsafe fn single_row_group<F: Format, S: Simd>(job: &Job, first_out: usize, outs: usize) {
    let w = job.weight;
    // Past the last output, repeat it: computed, never stored.
    let rows: [*const u8; SINGLE_ROW_GROUP] =
        std::array::from_fn(|o| w.row_blocks(first_out + o.min(outs - 1)).as_ptr());
    let mut acc = [S::zero(); SINGLE_ROW_GROUP];
    let chunks = F::BLOCK_ELEMS / CHUNK;
    // The group's rows are consecutive in memory, and so are the next groups': while
    // this group's blocks are multiplied, the weights `PREFETCH_GROUPS` groups on are
    // fetched, as fast as they are used (with the hardware's prefetcher alone, a lone row
    // waited on memory half the time).
    let group_bytes = SINGLE_ROW_GROUP * w.row_bytes();
    let ahead = rows[0].wrapping_add(PREFETCH_GROUPS * group_bytes);
    let step_bytes = SINGLE_ROW_GROUP * F::BLOCK_BYTES;
    for b in 0..w.in_features() / F::BLOCK_ELEMS {
        for line in (0..step_bytes).step_by(CACHE_LINE) {
            S::prefetch(ahead.wrapping_add(b * step_bytes + line));
        }
        for chunk in 0..chunks {
            let x = job.x.as_ptr().add((b * chunks + chunk) * CHUNK);
            for o in 0..SINGLE_ROW_GROUP {
                let block =
                    std::slice::from_raw_parts(rows[o].add(b * F::BLOCK_BYTES), F::BLOCK_BYTES);
                for (i, ws) in S::dequantize_chunk::<F>(block, chunk)
                    .into_iter()
                    .enumerate()
                {
                    acc[o] = S::mul_add(S::load(x.add(i * LANES)), ws, acc[o]);
                }
            }
        }
    }
    for (o, &acc) in acc.iter().enumerate().take(outs) {
        *job.y.add(first_out + o) = S::sum(acc);
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
