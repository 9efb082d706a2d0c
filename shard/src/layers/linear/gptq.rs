//! AutoGPTQ / GPTQModel layout: `qweight` `[in * bits / 32, out]` int32 packed along the
//! inputs, `qzeros` `[groups, out * bits / 32]` int32 packed along the outputs (lowest
//! bits first), `scales` `[groups, out]` f16, `g_idx` `[in]` int32 the group of each
//! input feature; `w = (q - zero) * scale`. GPTQ v1 stores every zero less one.
//!
//! Act-order (`desc_act`): the groups follow `g_idx`, not the input order. Each input
//! feature carries its group through the load, so the features' order is never
//! changed and any share of them (row-parallel ranks) reads the groups it uses.

use super::groups::{groups_of_share, to_f32s, unpack_columns, unpack_rows, GroupQuantized, Share};
use crate::weights::{Part, Weights};
use candle_core::{bail, Result};
use model_store::quantization::GptqConfig;

/// The `[out, in]` layer at `w` (this rank's `part`).
pub fn load(
    w: &Weights,
    (out_dim, in_dim): (usize, usize),
    part: Option<&Part>,
    cfg: &GptqConfig,
) -> Result<GroupQuantized> {
    let per_word = (32 / cfg.bits) as usize;
    let share = Share::of(w, (out_dim, in_dim), part, per_word, per_word)?;
    let num_groups = cfg.group_size.map_or(1, |g| in_dim.div_ceil(g));
    let inputs = share.inputs.clone();
    let groups: Vec<u32> = if w.contains("g_idx") {
        let rows = (inputs.len() != in_dim).then(|| Part { dim: 0, range: inputs.clone() });
        let g_idx = w.stored_part("g_idx", &[in_dim], rows.as_ref())?.to_vec1::<i32>()?;
        match g_idx.iter().find(|&&g| g < 0 || g as usize >= num_groups) {
            Some(bad) => bail!("{}: group {bad} of {num_groups}", w.full_name("g_idx")),
            None => g_idx.into_iter().map(|g| g as u32).collect(),
        }
    } else if cfg.desc_act {
        bail!("{}: missing, and desc_act (act-order) needs it", w.full_name("g_idx"))
    } else {
        let group = cfg.group_size.unwrap_or(in_dim);
        inputs.clone().map(|i| (i / group) as u32).collect()
    };
    let (group_rows, groups) = groups_of_share(&groups);
    let qweight = w.stored_part(
        "qweight",
        &[in_dim / per_word, out_dim],
        share.part(1, inputs.start / per_word..inputs.end / per_word, in_dim / per_word).as_ref(),
    )?;
    let qzeros = w.stored_part(
        "qzeros",
        &[num_groups, out_dim / per_word],
        share.part(per_word, group_rows.clone(), num_groups).as_ref(),
    )?;
    let scales = w.stored_part(
        "scales",
        &[num_groups, out_dim],
        share.part(1, group_rows, num_groups).as_ref(),
    )?;
    let in_order: Vec<usize> = (0..per_word).collect();
    let zero_offset = if cfg.zeros_less_one { 1.0 } else { 0.0 };
    let zeros = unpack_columns(&qzeros, cfg.bits, &in_order)?
        .into_iter()
        .map(|z| z as f32 + zero_offset)
        .collect();
    GroupQuantized::new(
        unpack_rows(&qweight, cfg.bits)?,
        groups,
        to_f32s(&scales)?,
        zeros,
        share.outputs.len(),
    )
}
