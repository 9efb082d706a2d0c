//! Choosing the next token of every request of a batch.
//!
//! Requests that neither sample, nor penalise, nor warp, nor want alternatives (plain
//! greedy) are served entirely on the model's device: argmax and log-softmax run over
//! the whole logits tensor and only the chosen ids and their logprobs come back.
//! Any other request brings its row to the host, where the processors run in TGI's
//! order (repetition penalty, frequency/presence penalty, temperature, top-k, top-p,
//! typical-p) and the token is picked greedily or with the request's own seeded RNG,
//! so that a seed gives the same tokens whatever else is in the batch.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor, D};
use proto::v3::NextTokenChooserParameters;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};

/// A request's sampling parameters, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub typical_p: f32,
    pub do_sample: bool,
    pub seed: u64,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Unset parameters (`None`) mean plain greedy decoding.
    pub fn from_proto(p: Option<&NextTokenChooserParameters>) -> Result<Self> {
        let Some(p) = p else {
            return Ok(Self::default());
        };
        let params = Self {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            typical_p: p.typical_p,
            do_sample: p.do_sample,
            seed: p.seed,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
        };
        ensure!(
            params.temperature.is_finite() && params.temperature > 0.0,
            "temperature must be > 0, got {}",
            params.temperature
        );
        for (name, value) in [("top_p", params.top_p), ("typical_p", params.typical_p)] {
            ensure!(
                value > 0.0 && value <= 1.0,
                "{name} must be in (0, 1], got {value}"
            );
        }
        ensure!(
            params.repetition_penalty.is_finite() && params.repetition_penalty > 0.0,
            "repetition_penalty must be > 0, got {}",
            params.repetition_penalty
        );
        for (name, value) in [
            ("frequency_penalty", params.frequency_penalty),
            ("presence_penalty", params.presence_penalty),
        ] {
            ensure!(value.is_finite(), "{name} must be finite, got {value}");
        }
        Ok(params)
    }

    fn warps(&self) -> bool {
        self.temperature != 1.0 || self.top_k > 0 || self.top_p < 1.0 || self.typical_p < 1.0
    }

    fn penalises(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }
}

/// The chosen token of one request in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub id: u32,
    /// Log-probability of `id` under the processed distribution.
    pub logprob: f32,
    /// The `top_n_tokens` most likely (id, logprob), most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Per-request token chooser: parameters, RNG and the token history the penalties need.
pub struct NextTokenChooser {
    params: SamplingParams,
    top_n_tokens: usize,
    rng: StdRng,
    /// Every token of the prompt and the generation, for the repetition penalty.
    seen: HashSet<u32>,
    /// How often each generated token occurred, for frequency/presence penalties.
    generated_counts: HashMap<u32, u32>,
}

impl NextTokenChooser {
    pub fn new(params: SamplingParams, top_n_tokens: usize, prompt: &[u32]) -> Self {
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            top_n_tokens,
            seen,
            generated_counts: HashMap::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether the row must be processed on the host (anything but plain greedy).
    fn needs_host_row(&self) -> bool {
        self.params.do_sample
            || self.params.warps()
            || self.params.penalises()
            || self.top_n_tokens > 0
    }

    /// Records a generated token for the penalties.
    pub fn record(&mut self, token: u32) {
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        *self.generated_counts.entry(token).or_default() += 1;
    }

    /// Processes one row of logits on the host and picks a token.
    fn choose_from_row(&mut self, mut logits: Vec<f32>) -> Result<Choice> {
        self.apply_penalties(&mut logits);
        apply_warpers(&self.params, &mut logits);
        let logprobs = log_softmax(&logits);
        let id = if self.params.do_sample {
            sample(&logprobs, &mut self.rng)
        } else {
            argmax(&logprobs)
        };
        Ok(Choice {
            id: id as u32,
            logprob: logprobs[id],
            top: top_n(&logprobs, self.top_n_tokens),
        })
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            for &token in &self.seen {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
                }
            }
        }
        let (frequency, presence) = (self.params.frequency_penalty, self.params.presence_penalty);
        if frequency != 0.0 || presence != 0.0 {
            for (&token, &count) in &self.generated_counts {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= frequency * count as f32 + presence;
                }
            }
        }
    }
}

/// Temperature, top-k, top-p and typical-p, as transformers' warpers: filtered tokens get -inf.
fn apply_warpers(params: &SamplingParams, logits: &mut [f32]) {
    if params.temperature != 1.0 {
        logits.iter_mut().for_each(|l| *l /= params.temperature);
    }
    if params.top_k > 0 && params.top_k < logits.len() {
        let mut sorted = logits.to_vec();
        let (_, kth, _) = sorted.select_nth_unstable_by(params.top_k - 1, |a, b| b.total_cmp(a));
        let threshold = *kth;
        logits
            .iter_mut()
            .filter(|l| **l < threshold)
            .for_each(|l| *l = f32::NEG_INFINITY);
    }
    if params.top_p < 1.0 {
        let probs = softmax(logits);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        // Keep the most likely tokens until their mass reaches top_p (at least one).
        let mut mass = 0.0;
        for &i in &order {
            if mass >= params.top_p {
                logits[i] = f32::NEG_INFINITY;
            }
            mass += probs[i];
        }
    }
    if params.typical_p < 1.0 {
        let logprobs = log_softmax(logits);
        let entropy: f32 = -logprobs
            .iter()
            .filter(|l| l.is_finite())
            .map(|&l| l * l.exp())
            .sum::<f32>();
        // Tokens ranked by how close their information content is to the entropy.
        let surprise_gap: Vec<f32> = logprobs.iter().map(|&l| (-l - entropy).abs()).collect();
        let mut order: Vec<usize> = (0..logits.len())
            .filter(|&i| logprobs[i].is_finite())
            .collect();
        order.sort_unstable_by(|&a, &b| surprise_gap[a].total_cmp(&surprise_gap[b]));
        let mut mass = 0.0;
        for &i in &order {
            if mass >= params.typical_p {
                logits[i] = f32::NEG_INFINITY;
            }
            mass += logprobs[i].exp();
        }
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    log_softmax(logits).into_iter().map(f32::exp).collect()
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln() + max;
    logits.iter().map(|&l| l - log_sum).collect()
}

/// First index of the largest value.
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Draws an index from the distribution `exp(logprobs)` with the Gumbel-max trick:
/// argmax of logprob + Gumbel noise, one draw per token. Unlike inverting the CDF,
/// where float error accumulates over the whole vocabulary, a tiny change in the
/// logits (another batch shape) only flips the draw between near-tied candidates.
fn sample(logprobs: &[f32], rng: &mut StdRng) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &logprob) in logprobs.iter().enumerate() {
        // 1 - U is in (0, 1]: the logarithms stay finite.
        let uniform = 1.0 - rng.random::<f32>();
        let key = logprob - (-uniform.ln()).ln();
        if key > best.1 {
            best = (i, key);
        }
    }
    best.0
}

/// The `n` most likely tokens with a finite logprob, most likely first.
fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return vec![];
    }
    let mut order: Vec<usize> = (0..logprobs.len())
        .filter(|&i| logprobs[i].is_finite())
        .collect();
    let n = n.min(order.len());
    if n < order.len() {
        order.select_nth_unstable_by(n - 1, |&a, &b| logprobs[b].total_cmp(&logprobs[a]));
        order.truncate(n);
    }
    order.sort_unstable_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b)));
    order.into_iter().map(|i| (i as u32, logprobs[i])).collect()
}

/// Chooses one token per row of `logits` (`[choosers.len(), vocab]`, f32, on the model's device).
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
    // Device path for every row at once; host rows overwrite their entry below.
    let (greedy_ids, greedy_logprobs) = greedy_rows(&logits)?;
    choosers
        .iter_mut()
        .enumerate()
        .map(|(row, chooser)| {
            if chooser.needs_host_row() {
                chooser.choose_from_row(logits.get(row)?.to_vec1::<f32>()?)
            } else {
                Ok(Choice {
                    id: greedy_ids[row],
                    logprob: greedy_logprobs[row],
                    top: vec![],
                })
            }
        })
        .collect()
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

    fn chooser(params: SamplingParams) -> NextTokenChooser {
        NextTokenChooser::new(params, 0, &[])
    }

    fn kept(logits: &[f32]) -> Vec<usize> {
        (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect()
    }

    #[test]
    fn greedy_runs_on_device_and_matches_host_argmax() {
        let logits = Tensor::new(&[[0.1f32, 2.0, -1.0], [3.0, 0.0, 1.0]], &Device::Cpu).unwrap();
        let (mut a, mut b) = (
            chooser(SamplingParams::default()),
            chooser(SamplingParams::default()),
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
        let mut c = NextTokenChooser::new(SamplingParams::default(), 2, &[]);
        let choice = choose_tokens(&logits, &mut [&mut c]).unwrap().remove(0);
        assert_eq!(choice.id, 1);
        let ids: Vec<u32> = choice.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(choice.top[0].1, choice.logprob);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let c = NextTokenChooser::new(params, 0, &[0, 1]);
        let mut logits = vec![4.0, -1.0, 3.0];
        c.apply_penalties(&mut logits);
        assert_eq!(logits, vec![2.0, -2.0, 3.0]);
    }

    #[test]
    fn frequency_and_presence_penalties_count_generated_tokens_only() {
        let params = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 1.0,
            ..Default::default()
        };
        let mut c = NextTokenChooser::new(params, 0, &[2]);
        c.record(0);
        c.record(0);
        c.record(1);
        let mut logits = vec![5.0, 5.0, 5.0];
        c.apply_penalties(&mut logits);
        assert_eq!(logits, vec![3.0, 3.5, 5.0]);
    }

    #[test]
    fn temperature_scales_logits() {
        let params = SamplingParams {
            temperature: 0.5,
            ..Default::default()
        };
        let mut logits = vec![1.0, -2.0];
        apply_warpers(&params, &mut logits);
        assert_eq!(logits, vec![2.0, -4.0]);
    }

    #[test]
    fn top_k_keeps_the_k_largest() {
        let params = SamplingParams {
            top_k: 2,
            ..Default::default()
        };
        let mut logits = vec![1.0, 4.0, 3.0, 0.0];
        apply_warpers(&params, &mut logits);
        assert_eq!(kept(&logits), vec![1, 2]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        // Probabilities 0.5, 0.3, 0.2.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        for (top_p, expected) in [(0.5, vec![0]), (0.6, vec![0, 1]), (0.85, vec![0, 1, 2])] {
            let params = SamplingParams {
                top_p,
                ..Default::default()
            };
            let mut l = logits.clone();
            apply_warpers(&params, &mut l);
            assert_eq!(kept(&l), expected, "top_p {top_p}");
        }
    }

    #[test]
    fn typical_p_keeps_tokens_closest_to_the_entropy() {
        // Entropy of (0.4, 0.4, 0.1, 0.1) is ~1.19 nats: the 0.4 tokens (surprise 0.92)
        // are more typical than the 0.1 ones (2.30).
        let logits: Vec<f32> = [0.1f32, 0.4, 0.4, 0.1].iter().map(|p| p.ln()).collect();
        let params = SamplingParams {
            typical_p: 0.5,
            ..Default::default()
        };
        let mut l = logits.clone();
        apply_warpers(&params, &mut l);
        assert_eq!(kept(&l), vec![1, 2]);
    }

    #[test]
    fn same_seed_same_tokens_and_samples_follow_the_distribution() {
        let params = SamplingParams {
            do_sample: true,
            seed: 42,
            ..Default::default()
        };
        let row: Vec<f32> = [0.7f32, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let draw = |params: &SamplingParams| -> Vec<u32> {
            let mut c = chooser(params.clone());
            (0..200)
                .map(|_| c.choose_from_row(row.clone()).unwrap().id)
                .collect()
        };
        let first = draw(&params);
        assert_eq!(first, draw(&params));
        assert_ne!(
            first,
            draw(&SamplingParams {
                seed: 7,
                ..params.clone()
            })
        );
        let zeros = first.iter().filter(|&&t| t == 0).count();
        assert!(
            (110..170).contains(&zeros),
            "token 0 drawn {zeros}/200 times"
        );
    }

    #[test]
    fn sampling_never_picks_filtered_tokens() {
        let params = SamplingParams {
            do_sample: true,
            top_k: 1,
            seed: 3,
            ..Default::default()
        };
        let mut c = chooser(params);
        for _ in 0..50 {
            let choice = c.choose_from_row(vec![1.0, 1.5, 0.5]).unwrap();
            assert_eq!(choice.id, 1);
            assert_eq!(choice.logprob, 0.0);
        }
    }

    #[test]
    fn rejects_invalid_parameters() {
        let valid = NextTokenChooserParameters::greedy();
        assert!(SamplingParams::from_proto(Some(&valid)).is_ok());
        for bad in [
            NextTokenChooserParameters {
                temperature: 0.0,
                ..valid
            },
            NextTokenChooserParameters {
                top_p: 1.5,
                ..valid
            },
            NextTokenChooserParameters {
                typical_p: 0.0,
                ..valid
            },
            NextTokenChooserParameters {
                repetition_penalty: -1.0,
                ..valid
            },
        ] {
            assert!(SamplingParams::from_proto(Some(&bad)).is_err(), "{bad:?}");
        }
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
