//! AutoAWQ's GEMM layout (`version: "gemm"`): `qweight` `[in, out / 8]` and `qzeros`
//! `[in / group, out / 8]` int32, eight 4-bit values a word in AWQ's interleaved order
//! (the k-th lowest nibble is column `AWQ_ORDER[k]` of the word's eight), `scales`
//! `[in / group, out]` f16; `w = (q - zero) * scale`.

use super::groups::{groups_of_share, to_f32s, unpack_columns, GroupQuantized, Share};
use crate::weights::{Part, Weights};
use candle_core::Result;

const BITS: u32 = 4;
const PER_WORD: usize = 8;
/// The column (of its word's eight) of each nibble, lowest first (AutoAWQ's order_map).
const AWQ_ORDER: [usize; PER_WORD] = [0, 2, 4, 6, 1, 3, 5, 7];

/// The `[out, in]` layer at `w` (this rank's `part`).
pub fn load(
    w: &Weights,
    (out_dim, in_dim): (usize, usize),
    part: Option<&Part>,
    group_size: usize,
) -> Result<GroupQuantized> {
    let share = Share::of(w, (out_dim, in_dim), part, PER_WORD, 1)?;
    let num_groups = in_dim.div_ceil(group_size);
    let groups: Vec<u32> = share.inputs.clone().map(|i| (i / group_size) as u32).collect();
    let (group_rows, groups) = groups_of_share(&groups);
    let qweight = w.stored_part(
        "qweight",
        &[in_dim, out_dim / PER_WORD],
        share.part(PER_WORD, share.inputs.clone(), in_dim).as_ref(),
    )?;
    let qzeros = w.stored_part(
        "qzeros",
        &[num_groups, out_dim / PER_WORD],
        share.part(PER_WORD, group_rows.clone(), num_groups).as_ref(),
    )?;
    let scales = w.stored_part(
        "scales",
        &[num_groups, out_dim],
        share.part(1, group_rows, num_groups).as_ref(),
    )?;
    let zeros = unpack_columns(&qzeros, BITS, &AWQ_ORDER)?;
    GroupQuantized::new(
        unpack_columns(&qweight, BITS, &AWQ_ORDER)?,
        groups,
        to_f32s(&scales)?,
        zeros.into_iter().map(f32::from).collect(),
        share.outputs.len(),
    )
}
