//! Choosing the next token of every request of a batch.
//!
//! A batch of plain greedy requests (no penalty, no warper, no alternatives) is served
//! by one argmax over the logits on their device. Any other batch goes through the
//! whole sampler: on a GPU one kernel processes every row of the step at once and only
//! the chosen ids, their logprobs and the asked-for alternatives come back (`device`);
//! on the CPU the same steps run on the host, rows in parallel (`host`). Both apply the
//! processors in TGI's order (repetition penalty, frequency/presence penalty,
//! temperature, top-k, top-p, then min-p and typical-p), find thresholds without sorting
//! the vocabulary, and draw with a counter-based generator keyed by the request's seed
//! and the token's index, so a seed gives the same tokens whatever else is in the batch.
//! A row constrained by a grammar (`grammar`) has the tokens its grammar forbids set to
//! -inf first, whether it samples or not.

#[cfg(feature = "cuda")]
mod device;
pub mod grammar;
mod host;
mod params;
mod philox;

pub use grammar::GrammarRow;
pub use params::{SamplingParams, MAX_TOP_N_TOKENS};

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor, D};
use rayon::prelude::*;
use std::collections::HashMap;

/// The chosen token of one request in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub id: u32,
    /// Log-probability of `id` under the processed distribution.
    pub logprob: f32,
    /// The `top_n_tokens` most likely (id, logprob) of what the processors kept, most
    /// likely first.
    pub top: Vec<(u32, f32)>,
}

/// Per-request token chooser: parameters, and the history the penalties and the draw need.
pub struct NextTokenChooser {
    params: SamplingParams,
    top_n_tokens: usize,
    /// The tokens the penalties apply to, with the times each was generated: the
    /// prompt's (0 times) for the repetition penalty, and every generated one.
    penalised: HashMap<u32, u32>,
    /// Tokens chosen so far: the index of the next one, the draw's counter.
    step: u32,
    /// The grammar the output follows, for a constrained request.
    grammar: Option<GrammarRow>,
}

impl NextTokenChooser {
    pub fn new(params: SamplingParams, top_n_tokens: usize, prompt: &[u32]) -> Result<Self> {
        Self::constrained(params, top_n_tokens, prompt, None)
    }

    pub fn constrained(
        params: SamplingParams,
        top_n_tokens: usize,
        prompt: &[u32],
        grammar: Option<GrammarRow>,
    ) -> Result<Self> {
        ensure!(
            top_n_tokens <= MAX_TOP_N_TOKENS,
            "top_n_tokens must be at most {MAX_TOP_N_TOKENS}, got {top_n_tokens}"
        );
        let penalised = if params.repetition_penalty != 1.0 {
            prompt.iter().map(|&token| (token, 0)).collect()
        } else {
            HashMap::new()
        };
        Ok(Self {
            params,
            top_n_tokens,
            penalised,
            step: 0,
            grammar,
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether the row needs more than the plain argmax.
    fn needs_processing(&self) -> bool {
        self.params.do_sample
            || self.grammar.is_some()
            || self.params.warps()
            || self.params.penalises()
            || self.top_n_tokens > 0
    }

    /// Records a generated token for the penalties, the draw's counter and the grammar.
    pub fn record(&mut self, token: u32) -> Result<()> {
        self.step += 1;
        if self.params.penalises() {
            *self.penalised.entry(token).or_default() += 1;
        }
        match &mut self.grammar {
            Some(grammar) => grammar.accept(token),
            None => Ok(()),
        }
    }

    /// The request's grammar is complete: nothing may follow.
    pub fn grammar_finished(&self) -> bool {
        self.grammar.as_ref().is_some_and(GrammarRow::is_finished)
    }

    /// The tokens the grammar allows now (after [`wait_for_masks`]).
    fn allowed(&self) -> Option<&::grammar::TokenMask> {
        self.grammar.as_ref().and_then(GrammarRow::mask)
    }

    /// (token, times generated) for every token the penalties apply to.
    fn penalties(&self) -> Vec<(u32, u32)> {
        self.penalised.iter().map(|(&t, &n)| (t, n)).collect()
    }

    /// Processes one row of logits on the host and picks a token.
    fn choose_on_host(&self, logits: &[f32]) -> Choice {
        host::choose_row(
            logits,
            &self.params,
            &host::RowInputs {
                penalties: &self.penalties(),
                step: self.step,
                top_n: self.top_n_tokens,
                allowed: self.allowed(),
            },
        )
    }
}

/// Waits for the masks of the constrained rows, computed by the grammar workers.
fn wait_for_masks(choosers: &mut [&mut NextTokenChooser]) -> Result<()> {
    for grammar in choosers.iter_mut().filter_map(|c| c.grammar.as_mut()) {
        grammar.wait()?;
    }
    Ok(())
}

/// Chooses one token per row of `logits` (`[choosers.len(), vocab]`, on the model's device).
pub fn choose_tokens(
    logits: &Tensor,
    choosers: &mut [&mut NextTokenChooser],
) -> Result<Vec<Choice>> {
    let (rows, _vocab) = logits.dims2()?;
    if rows != choosers.len() {
        bail!("{rows} logits rows for {} requests", choosers.len());
    }
    if rows == 0 {
        return Ok(vec![]);
    }
    let logits = logits.to_dtype(DType::F32)?;
    wait_for_masks(choosers)?;
    let plain = |c: &NextTokenChooser| !c.needs_processing();
    if choosers.iter().all(|c| plain(c)) {
        let (ids, logprobs) = greedy_rows(&logits)?;
        return Ok(ids
            .into_iter()
            .zip(logprobs)
            .map(|(id, logprob)| Choice {
                id,
                logprob,
                top: vec![],
            })
            .collect());
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return device::choose_tokens(&logits, choosers);
    }
    // The CPU: plain rows take the batch's argmax (only computed when there are some),
    // the others the host sampler.
    let host_rows: Vec<usize> = (0..rows).filter(|&r| !plain(choosers[r])).collect();
    let (greedy_ids, greedy_logprobs) = if host_rows.len() < rows {
        greedy_rows(&logits)?
    } else {
        (vec![], vec![])
    };
    let host_logits = logits
        .index_select(&Tensor::new(host_rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), logits.device())?, 0)?
        .to_vec2::<f32>()?;
    let host_choices: Vec<Choice> = host_rows
        .par_iter()
        .zip(host_logits.par_iter())
        .map(|(&row, logits)| choosers[row].choose_on_host(logits))
        .collect();
    let mut host_choices = host_choices.into_iter();
    Ok((0..rows)
        .map(|row| {
            if plain(choosers[row]) {
                Choice {
                    id: greedy_ids[row],
                    logprob: greedy_logprobs[row],
                    top: vec![],
                }
            } else {
                host_choices.next().expect("one host choice per host row")
            }
        })
        .collect())
}

/// The argmax of every row of `logits` (`[rows, vocab]` f32) and its log-probability,
/// computed on the logits' device; one read back. On CUDA one kernel reduces each row
/// in one pass (the candle ops below were ~15 kernels, 0.3 ms a step at batch 1 and
/// 1.1 ms at batch 64 on an H100); elsewhere candle reduces each row in two passes over
/// chunks of about sqrt(vocab) entries, which spreads it over many blocks.
fn greedy_rows(logits: &Tensor) -> Result<(Vec<u32>, Vec<f32>)> {
    // On a GPU, one kernel does the whole reduction.
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return Ok(text_generation_kernels::greedy(&logits.contiguous()?)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(|row| (row[0] as u32, row[1]))
            .unzip());
    }
    let (rows, vocab) = logits.dims2()?;
    let chunk = reduction_chunk(vocab);
    let chunks = logits.reshape((rows, vocab / chunk, chunk))?;
    let chunk_max = chunks.max_keepdim(D::Minus1)?;
    let chunk_argmax = chunks.argmax_keepdim(D::Minus1)?;
    // `[rows, 1, 1]`: the chunk holding the row's maximum, and the maximum.
    let best_chunk = chunk_max.argmax_keepdim(1)?;
    let row_max = chunk_max.gather(&best_chunk, 1)?;
    let argmax_in_chunk = chunk_argmax.gather(&best_chunk, 1)?;
    // log-softmax at the maximum: -log(sum(exp(x - max))).
    let logprob = chunks
        .broadcast_sub(&row_max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .sum_keepdim(1)?
        .log()?
        .neg()?;
    // Ids below 2^24 are exact in f32: one tensor, one read back.
    let packed = Tensor::cat(
        &[
            best_chunk.to_dtype(DType::F32)?,
            argmax_in_chunk.to_dtype(DType::F32)?,
            logprob,
        ],
        2,
    )?
    .reshape((rows, 3))?
    .to_vec2::<f32>()?;
    // [chunk index, index in the chunk, logprob] per row.
    Ok(packed
        .into_iter()
        .map(|row| (row[0] as u32 * chunk as u32 + row[1] as u32, row[2]))
        .unzip())
}

/// Entries per chunk of a `vocab`-wide row: vocab / d for the largest divisor d of
/// vocab not above sqrt(vocab) (the whole row when vocab is prime).
fn reduction_chunk(vocab: usize) -> usize {
    let root = (vocab as f64).sqrt() as usize;
    let divisor = (1..=root.max(1))
        .rev()
        .find(|d| vocab.is_multiple_of(*d))
        .unwrap_or(1);
    vocab / divisor
}

/// Rows of prompt logits turned into logprobs at once: bounds the temporary
/// `[rows, vocab]` log-softmax of long prompts.
const PROMPT_LOGPROB_CHUNK_ROWS: usize = 512;

/// Log-probability of each `targets[i]` under row `rows[i]` of `logits` (`[_, vocab]`),
/// computed on the device: the prompt logprobs of `prefill_logprobs` requests.
pub fn target_logprobs(logits: &Tensor, rows: &[u32], targets: &[u32]) -> Result<Vec<f32>> {
    ensure!(
        rows.len() == targets.len(),
        "{} rows for {} targets",
        rows.len(),
        targets.len()
    );
    let mut logprobs = Vec::with_capacity(targets.len());
    for (rows, targets) in rows
        .chunks(PROMPT_LOGPROB_CHUNK_ROWS)
        .zip(targets.chunks(PROMPT_LOGPROB_CHUNK_ROWS))
    {
        let device = logits.device();
        let selected = logits.index_select(&Tensor::new(rows, device)?, 0)?;
        let targets = Tensor::from_slice(targets, (targets.len(), 1), device)?;
        let chunk = candle_nn::ops::log_softmax(&selected.to_dtype(DType::F32)?, D::Minus1)?;
        logprobs.extend(
            chunk
                .gather(&targets, D::Minus1)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    Ok(logprobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn chooser(params: SamplingParams, top_n: usize, prompt: &[u32]) -> NextTokenChooser {
        NextTokenChooser::new(params, top_n, prompt).unwrap()
    }

    fn log_softmax(logits: &[f32]) -> Vec<f32> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln() + max;
        logits.iter().map(|&l| l - log_sum).collect()
    }

    fn sampled(seed: u64) -> SamplingParams {
        SamplingParams {
            do_sample: true,
            seed,
            temperature: 0.8,
            top_p: 0.95,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_runs_on_device_and_matches_host_argmax() {
        let logits = Tensor::new(&[[0.1f32, 2.0, -1.0], [3.0, 0.0, 1.0]], &Device::Cpu).unwrap();
        let (mut a, mut b) = (
            chooser(SamplingParams::default(), 0, &[]),
            chooser(SamplingParams::default(), 0, &[]),
        );
        let choices = choose_tokens(&logits, &mut [&mut a, &mut b]).unwrap();
        assert_eq!(choices.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 0]);
        let expected = log_softmax(&[0.1, 2.0, -1.0])[1];
        assert!((choices[0].logprob - expected).abs() < 1e-5);
    }

    #[test]
    fn chunked_greedy_rows_match_a_one_pass_argmax_and_log_softmax() {
        assert_eq!(reduction_chunk(128_256), 384);
        assert_eq!(reduction_chunk(49_152), 256);
        assert_eq!(reduction_chunk(1_009), 1_009); // prime: one chunk
        let mut rng = StdRng::seed_from_u64(7);
        for vocab in [1, 7, 1_009, 4_096, 6_000] {
            let rows: Vec<Vec<f32>> = (0..3)
                .map(|_| {
                    (0..vocab)
                        .map(|_| rng.random_range(-20.0f32..20.0))
                        .collect()
                })
                .collect();
            let logits = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
            let (ids, logprobs) = greedy_rows(&logits).unwrap();
            for (row, (id, logprob)) in rows.iter().zip(ids.iter().zip(logprobs)) {
                let best = (0..vocab).fold(0, |b, i| if row[i] > row[b] { i } else { b });
                assert_eq!(*id as usize, best, "vocab {vocab}");
                assert!(
                    (logprob - log_softmax(row)[best]).abs() < 1e-4,
                    "vocab {vocab}"
                );
            }
        }
    }

    #[test]
    fn top_n_tokens_come_sorted_with_logprobs() {
        let logits = Tensor::new(&[[0.0f32, 3.0, 1.0, 2.0]], &Device::Cpu).unwrap();
        let mut c = chooser(SamplingParams::default(), 2, &[]);
        let choice = choose_tokens(&logits, &mut [&mut c]).unwrap().remove(0);
        assert_eq!(choice.id, 1);
        let ids: Vec<u32> = choice.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(choice.top[0].1, choice.logprob);
        assert!((choice.logprob - log_softmax(&[0.0, 3.0, 1.0, 2.0])[1]).abs() < 1e-6);
    }

    #[test]
    fn penalties_follow_the_prompt_and_the_generated_counts() {
        // Repetition penalty on the prompt's tokens; frequency/presence on generated ones.
        let mut c = chooser(
            SamplingParams {
                repetition_penalty: 2.0,
                frequency_penalty: 0.5,
                presence_penalty: 1.0,
                ..Default::default()
            },
            0,
            &[0, 0],
        );
        let mut penalties = c.penalties();
        assert_eq!(penalties, vec![(0, 0)]);
        c.record(1).unwrap();
        c.record(1).unwrap();
        penalties = c.penalties();
        penalties.sort_unstable();
        assert_eq!(penalties, vec![(0, 0), (1, 2)]);
        // Without a repetition penalty the prompt is not tracked.
        let frequency_only = chooser(
            SamplingParams {
                frequency_penalty: 0.5,
                ..Default::default()
            },
            0,
            &[3, 4],
        );
        assert!(frequency_only.penalties().is_empty());
        // Logits 4 (prompt token: 4 / 2 = 2), 5 (generated twice: 5 / 2 - 2 = 0.5), 3.
        let logits = Tensor::new(&[[4.0f32, 5.0, 3.0]], &Device::Cpu).unwrap();
        assert_eq!(choose_tokens(&logits, &mut [&mut c]).unwrap()[0].id, 2);
    }

    #[test]
    fn a_seeded_request_draws_the_same_tokens_alone_and_in_a_batch() {
        let mut rng = StdRng::seed_from_u64(3);
        let vocab = 2_000;
        let steps: Vec<Vec<Vec<f32>>> = (0..8)
            .map(|_| {
                (0..5)
                    .map(|_| (0..vocab).map(|_| rng.random_range(-4.0f32..4.0)).collect())
                    .collect()
            })
            .collect();
        let run = |rows: &[usize], choosers: &mut Vec<NextTokenChooser>| -> Vec<Vec<u32>> {
            let mut tokens = vec![vec![]; rows.len()];
            for step in &steps {
                let logits: Vec<Vec<f32>> = rows.iter().map(|&r| step[r].clone()).collect();
                let logits = Tensor::new(logits, &Device::Cpu).unwrap();
                let mut refs: Vec<&mut NextTokenChooser> = choosers.iter_mut().collect();
                let choices = choose_tokens(&logits, &mut refs).unwrap();
                for ((c, t), choice) in choosers.iter_mut().zip(&mut tokens).zip(choices) {
                    c.record(choice.id).unwrap();
                    t.push(choice.id);
                }
            }
            tokens
        };
        let alone = run(&[2], &mut vec![chooser(sampled(42), 0, &[])]);
        let mut batch = vec![
            chooser(SamplingParams::default(), 0, &[]),
            chooser(sampled(7), 3, &[]),
            chooser(sampled(42), 0, &[]),
            chooser(SamplingParams { top_k: 5, ..sampled(1) }, 0, &[]),
        ];
        let batched = run(&[0, 1, 2, 3], &mut batch);
        assert_eq!(alone[0], batched[2]);
        assert_ne!(batched[1], batched[2], "different seeds drew the same 8 tokens");
    }

    #[test]
    fn mixed_batches_give_plain_rows_the_argmax_and_the_others_the_host_sampler() {
        let mut rng = StdRng::seed_from_u64(5);
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..300).map(|_| rng.random_range(-3.0f32..3.0)).collect())
            .collect();
        let logits = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
        let (mut plain, mut top_k, mut seeded) = (
            chooser(SamplingParams::default(), 0, &[]),
            chooser(SamplingParams { top_k: 3, ..Default::default() }, 2, &[]),
            chooser(sampled(9), 1, &[]),
        );
        let expected = [top_k.choose_on_host(&rows[1]), seeded.choose_on_host(&rows[2])];
        let choices = choose_tokens(&logits, &mut [&mut plain, &mut top_k, &mut seeded]).unwrap();
        let argmax = (0..300).fold(0, |b, i| if rows[0][i] > rows[0][b] { i } else { b });
        assert_eq!(choices[0].id as usize, argmax);
        assert_eq!(choices[1..], expected);
        assert_eq!(choices[1].top.len(), 2);
    }

    #[test]
    fn too_many_alternatives_are_refused() {
        assert!(NextTokenChooser::new(SamplingParams::default(), MAX_TOP_N_TOKENS + 1, &[]).is_err());
    }

    #[test]
    fn prompt_logprobs_gather_the_targets() {
        let logits = Tensor::new(&[[0.0f32, 1.0], [2.0, 0.0]], &Device::Cpu).unwrap();
        let lp = target_logprobs(&logits, &[1, 0], &[0, 1]).unwrap();
        assert!((lp[0] - log_softmax(&[2.0, 0.0])[0]).abs() < 1e-6);
        assert!((lp[1] - log_softmax(&[0.0, 1.0])[1]).abs() < 1e-6);
        assert!(target_logprobs(&logits, &[0], &[]).is_err());
    }
}
