//! The batch's token choice on a GPU: every row's parameters and penalty entries go
//! up in two small copies, one kernel (`text_generation_kernels::sample`) processes
//! all rows at once, and one copy brings back only ids and logprobs. When some rows are
//! constrained by a grammar, their masks go up as one bitmask and a kernel sets the
//! tokens they forbid to -inf first.

use super::{Choice, NextTokenChooser};
use anyhow::Result;
use candle_core::Tensor;
use text_generation_kernels::{SampleRow, SAMPLE_ROW_WORDS};

/// Chooses one token per row of `logits` (`[rows, vocab]` f32 on a CUDA device).
pub fn choose_tokens(logits: &Tensor, choosers: &[&mut NextTokenChooser]) -> Result<Vec<Choice>> {
    let device = logits.device();
    let mut words = Vec::with_capacity(choosers.len() * SAMPLE_ROW_WORDS);
    let mut pairs: Vec<u32> = Vec::new();
    for chooser in choosers {
        let begin = (pairs.len() / 2) as u32;
        for (token, generated) in chooser.penalties() {
            pairs.extend([token, generated]);
        }
        let p = &chooser.params;
        let row = SampleRow {
            temperature: p.temperature,
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
            typical_p: p.typical_p,
            min_p: p.min_p,
            do_sample: p.do_sample,
            seed: p.seed,
            step: chooser.step,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            penalties: begin..(pairs.len() / 2) as u32,
            top_n: chooser.top_n_tokens as u32,
        };
        words.extend(row.to_words());
    }
    let rows = Tensor::from_vec(words, (choosers.len(), SAMPLE_ROW_WORDS), device)?;
    let penalties = if pairs.is_empty() {
        None
    } else {
        let entries = pairs.len() / 2;
        Some(Tensor::from_vec(pairs, (entries, 2), device)?)
    };
    let top_n = choosers.iter().map(|c| c.top_n_tokens).max().unwrap_or(0);
    let masked = grammar_masked(logits, choosers)?;
    let out = text_generation_kernels::sample(masked.as_ref().unwrap_or(logits), &rows, penalties.as_ref(), top_n)?
        .to_vec2::<f32>()?;
    Ok(out
        .into_iter()
        .zip(choosers)
        .map(|(row, chooser)| Choice {
            id: row[0] as u32,
            logprob: row[1],
            top: row[2..]
                .chunks_exact(2)
                .take(chooser.top_n_tokens)
                .filter(|pair| pair[0] >= 0.0)
                .map(|pair| (pair[0] as u32, pair[1]))
                .collect(),
        })
        .collect())
}

/// The logits with each constrained row's forbidden tokens at -inf (unconstrained rows
/// allow everything); None when no row is constrained.
fn grammar_masked(logits: &Tensor, choosers: &[&mut NextTokenChooser]) -> Result<Option<Tensor>> {
    if choosers.iter().all(|c| c.allowed().is_none()) {
        return Ok(None);
    }
    let words = logits.dim(1)?.div_ceil(32);
    let mut bits = Vec::with_capacity(choosers.len() * words);
    for chooser in choosers {
        match chooser.allowed() {
            Some(mask) => {
                let mask_words = &mask.words()[..mask.words().len().min(words)];
                bits.extend_from_slice(mask_words);
                bits.resize(bits.len() + words - mask_words.len(), 0);
            }
            None => bits.resize(bits.len() + words, u32::MAX),
        }
    }
    let allowed = Tensor::from_vec(bits, (choosers.len(), words), logits.device())?;
    Ok(Some(text_generation_kernels::mask_logits(logits, &allowed)?))
}

#[cfg(test)]
mod tests {
    //! The device sampler against the host one, on the GPU machine (skipped without a
    //! CUDA device): `shard/kernels/device-run.sh` runs them.
    use super::super::host::tests::kept_set;
    use super::super::{host, SamplingParams};
    use super::*;
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn gpu() -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(device) => Some(device),
            Err(e) => {
                eprintln!("no CUDA device, skipped: {e}");
                None
            }
        }
    }

    fn chooser(params: SamplingParams, top_n: usize, prompt: &[u32]) -> NextTokenChooser {
        NextTokenChooser::new(params, top_n, prompt).unwrap()
    }

    fn on_device(device: &Device, rows: &[Vec<f32>], choosers: &mut [NextTokenChooser]) -> Vec<Choice> {
        let logits = Tensor::new(rows.to_vec(), device).unwrap();
        let refs: Vec<&mut NextTokenChooser> = choosers.iter_mut().collect();
        choose_tokens(&logits, &refs).unwrap()
    }

    fn random_rows(rng: &mut StdRng, rows: usize, vocab: usize, scale: f32) -> Vec<Vec<f32>> {
        (0..rows)
            .map(|_| (0..vocab).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect())
            .collect()
    }

    /// Every filter keeps exactly the host's token set (read through all alternatives),
    /// greedy picks and logprobs agree, and penalties rewrite the same logits.
    #[test]
    fn device_rows_keep_the_host_sets_and_choose_the_host_tokens() {
        let Some(device) = gpu() else { return };
        let mut rng = StdRng::seed_from_u64(17);
        let cases = [
            SamplingParams { top_k: 20, ..Default::default() },
            SamplingParams { top_p: 0.9, temperature: 0.7, ..Default::default() },
            SamplingParams { top_p: 0.5, top_k: 30, ..Default::default() },
            SamplingParams { typical_p: 0.6, ..Default::default() },
            SamplingParams { min_p: 0.2, ..Default::default() },
            SamplingParams { top_k: 25, top_p: 0.95, typical_p: 0.9, min_p: 0.01, temperature: 1.3, ..Default::default() },
            SamplingParams { repetition_penalty: 1.3, frequency_penalty: 0.4, presence_penalty: 0.2, top_k: 10, ..Default::default() },
        ];
        for vocab in [1_000usize, 128_256] {
            // A low tail and 24 peaks far above it: every filter keeps fewer tokens than
            // the alternatives can show, so the kept sets compare in full.
            let mut rows = random_rows(&mut rng, cases.len(), vocab, 3.0);
            for row in &mut rows {
                for _ in 0..24 {
                    row[rng.random_range(0..vocab)] = rng.random_range(18.0f32..24.0);
                }
            }
            let prompt: Vec<u32> = (0..64).map(|_| rng.random_range(0..vocab as u32)).collect();
            let make = |i: usize| {
                let mut c = chooser(cases[i].clone(), crate::runner::sampler::MAX_TOP_N_TOKENS, &prompt);
                for &t in &prompt[..8] {
                    c.record(t).unwrap();
                }
                c
            };
            let mut choosers: Vec<NextTokenChooser> = (0..cases.len()).map(make).collect();
            let device_choices = on_device(&device, &rows, &mut choosers);
            for (i, choice) in device_choices.iter().enumerate() {
                let expected = choosers[i].choose_on_host(&rows[i]);
                assert_eq!(choice.id, expected.id, "vocab {vocab}, case {i}");
                assert!((choice.logprob - expected.logprob).abs() < 1e-4, "vocab {vocab}, case {i}");
                let ids = |c: &Choice| {
                    let mut ids: Vec<u32> = c.top.iter().map(|t| t.0).collect();
                    ids.sort_unstable();
                    ids
                };
                assert!(expected.top.len() < crate::runner::sampler::MAX_TOP_N_TOKENS, "case {i} keeps too much to compare");
                assert_eq!(ids(choice), ids(&expected), "vocab {vocab}, case {i}: kept sets");
                if cases[i].penalises() {
                    continue;
                }
                assert_eq!(ids(&expected), kept_set(&rows[i], &cases[i]));
            }
        }
    }

    /// The mask kernel keeps exactly the allowed entries (a ragged last word, a row
    /// allowing all, one allowing none past its words) and leaves the logits alone.
    #[test]
    fn device_masks_keep_only_the_allowed_tokens() {
        let Some(device) = gpu() else { return };
        let mut rng = StdRng::seed_from_u64(23);
        let vocab = 1_000;
        let rows = random_rows(&mut rng, 3, vocab, 5.0);
        let words = vocab.div_ceil(32);
        let mut bits: Vec<u32> = (0..words).map(|_| rng.random()).collect();
        bits.extend(std::iter::repeat_n(u32::MAX, words));
        bits.extend((0..words).map(|w| if w < 10 { u32::MAX } else { 0 }));
        let logits = Tensor::new(rows.clone(), &device).unwrap();
        let allowed = Tensor::from_vec(bits.clone(), (3, words), &device).unwrap();
        let masked = text_generation_kernels::mask_logits(&logits, &allowed).unwrap().to_vec2::<f32>().unwrap();
        for (r, row) in rows.iter().enumerate() {
            for (t, &x) in row.iter().enumerate() {
                let ok = bits[r * words + t / 32] >> (t % 32) & 1 == 1;
                assert_eq!(masked[r][t], if ok { x } else { f32::NEG_INFINITY }, "row {r}, token {t}");
            }
        }
        assert_eq!(logits.to_vec2::<f32>().unwrap(), rows);
    }

    /// Draws of one row over many steps follow the processed distribution (Pearson's
    /// chi-square; fixed seed, so the statistic is one fixed number), and a seeded row
    /// draws the same tokens alone and inside a batch of 64 mixed rows.
    #[test]
    fn device_draws_follow_the_distribution_and_do_not_depend_on_the_batch() {
        let Some(device) = gpu() else { return };
        let probs = [0.4f32, 0.25, 0.15, 0.1, 0.06, 0.04];
        let mut row: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        row.extend(std::iter::repeat_n(-40.0, 994));
        let params = SamplingParams { do_sample: true, seed: 1234, ..Default::default() };
        let draws = 3_000;
        let rows = vec![row.clone(); draws];
        let mut choosers: Vec<NextTokenChooser> = (0..draws)
            .map(|step| {
                let mut c = chooser(params.clone(), 0, &[]);
                c.step = step as u32;
                c
            })
            .collect();
        let ids: Vec<u32> = on_device(&device, &rows, &mut choosers).iter().map(|c| c.id).collect();
        let chi_square: f64 = probs
            .iter()
            .enumerate()
            .map(|(id, &p)| {
                let observed = ids.iter().filter(|&&d| d as usize == id).count() as f64;
                let expected = f64::from(p) * draws as f64;
                (observed - expected).powi(2) / expected
            })
            .sum();
        // 5 degrees of freedom: 20.5 is the 0.999 quantile.
        assert!(chi_square < 20.5, "chi-square {chi_square}");
        assert!(ids.iter().all(|&id| id < 6), "a token of mass e^-40 was drawn");
        // Host and device draw from the same counters: mostly the same tokens.
        let same = (0..draws)
            .filter(|&s| host::choose_row(&row, &params, &host::RowInputs { penalties: &[], step: s as u32, top_n: 0, allowed: None }).id == ids[s])
            .count();
        assert!(same * 100 >= draws * 99, "{same} of {draws} draws as on the host");

        let mut rng = StdRng::seed_from_u64(5);
        let vocab = 128_256;
        let batch = random_rows(&mut rng, 64, vocab, 6.0);
        let seeded = SamplingParams { do_sample: true, seed: 99, temperature: 0.7, top_p: 0.9, ..Default::default() };
        let alone = on_device(&device, &batch[10..11], &mut [chooser(seeded.clone(), 5, &[])]);
        let mut mixed: Vec<NextTokenChooser> = (0..64)
            .map(|i| match i % 4 {
                _ if i == 10 => chooser(seeded.clone(), 5, &[]),
                0 => chooser(SamplingParams::default(), 0, &[]),
                1 => chooser(SamplingParams { do_sample: true, seed: i as u64, ..Default::default() }, 0, &[]),
                2 => chooser(SamplingParams { top_k: 50, repetition_penalty: 1.1, do_sample: true, seed: 3, ..Default::default() }, 0, &[1, 2, 3]),
                _ => chooser(SamplingParams { min_p: 0.05, do_sample: true, seed: 4, ..Default::default() }, 2, &[]),
            })
            .collect();
        let together = on_device(&device, &batch, &mut mixed);
        assert_eq!(together[10], alone[0]);
    }
}
