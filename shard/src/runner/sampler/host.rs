//! The token choice of one row on the host, step by step as the device sampler does it
//! (`sample_f32` in shard/kernels/src/cu/sampling.cu): penalties (repetition, then
//! frequency + presence), temperature, top-k, top-p, min-p, typical-p, then the draw
//! (or the argmax), the chosen token's logprob and the most likely kept tokens.
//!
//! Thresholds come from a radix select over order-preserving keys (no sort of the
//! vocabulary), with the probability mass in the same fixed point as on the device,
//! so both keep the same tokens; the draw is an exponential race keyed by Philox, so a
//! seed gives the same token whatever the batch.

use super::philox::{philox, uniform};
use super::{Choice, SamplingParams};

/// Probability mass relative to the most likely token, in fixed point (`MASS_SCALE`
/// in sampling.cu).
const MASS_SCALE: f32 = (1u32 << 26) as f32;

/// A row's processing beyond its logits and parameters.
pub struct RowInputs<'a> {
    /// (token, times generated) for every token the penalties apply to.
    pub penalties: &'a [(u32, u32)],
    /// The index of the token being chosen: with the seed, the draw's counter.
    pub step: u32,
    pub top_n: usize,
    /// A constrained row's allowed tokens: the others are never chosen.
    pub allowed: Option<&'a grammar::TokenMask>,
}

/// Larger floats get larger keys.
fn order_key(v: f32) -> u32 {
    let bits = v.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

fn clean_logit(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

fn mass_of(e: f32) -> u32 {
    (e * MASS_SCALE) as u32
}

/// The largest key t such that the weights of the entries with key >= t add up to at
/// least `target` (0 when even all of them fall short); `item(i)` is entry i's (key,
/// weight). Four passes of 8 bits, most significant first, as on the device.
fn radix_select(len: usize, target: u64, item: impl Fn(usize) -> (u32, u32)) -> u32 {
    let mut prefix = 0u32;
    // Weight of the entries above the prefix's range.
    let mut above = 0u64;
    for shift in [24u32, 16, 8, 0] {
        let fixed = if shift == 24 { 0 } else { u32::MAX << (shift + 8) };
        let mut hist = [0u64; 256];
        for i in 0..len {
            let (key, weight) = item(i);
            if weight > 0 && key & fixed == prefix & fixed {
                hist[((key >> shift) & 255) as usize] += u64::from(weight);
            }
        }
        let mut running = above;
        for bin in (0..256).rev() {
            if running + hist[bin] >= target {
                prefix |= (bin as u32) << shift;
                above = running;
                break;
            }
            running += hist[bin];
        }
    }
    prefix
}

/// `fraction` of `total`, at least 1 (as the device computes it).
fn mass_target(fraction: f32, total: u64) -> u64 {
    ((f64::from(fraction) * total as f64) as u64).max(1)
}

/// Processes one row of logits and chooses its token.
pub fn choose_row(logits: &[f32], params: &SamplingParams, inputs: &RowInputs) -> Choice {
    let vocab = logits.len();
    // A product per entry rather than a division, as on the device (the same IEEE
    // result on both).
    let inverse_temperature = 1.0 / params.temperature;
    let mut w: Vec<f32> = logits
        .iter()
        .map(|&x| clean_logit(x) * inverse_temperature)
        .collect();
    for &(token, generated) in inputs.penalties {
        let Some(&x) = logits.get(token as usize) else {
            continue;
        };
        let mut v = clean_logit(x);
        let penalty = params.repetition_penalty;
        if penalty != 1.0 {
            v = if v < 0.0 { v * penalty } else { v / penalty };
        }
        if generated > 0 {
            v -= params
                .frequency_penalty
                .mul_add(generated as f32, params.presence_penalty);
        }
        w[token as usize] = v * inverse_temperature;
    }
    if let Some(allowed) = inputs.allowed {
        for (token, v) in (0..).zip(w.iter_mut()) {
            if !allowed.allows(token) {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // Nothing to choose from: token 0, and a NaN logprob says so.
        return Choice {
            id: 0,
            logprob: f32::NAN,
            top: vec![],
        };
    }
    let keys: Vec<u32> = w.iter().map(|&v| order_key(v)).collect();
    let e: Vec<f32> = w.iter().map(|&v| (v - max).exp()).collect();

    let top_k_key = if params.top_k > 0 && params.top_k < vocab {
        radix_select(vocab, params.top_k as u64, |i| (keys[i], 1))
    } else {
        0
    };
    let top_p_key = if params.top_p < 1.0 {
        let weight = |i: usize| {
            if keys[i] >= top_k_key {
                mass_of(e[i])
            } else {
                0
            }
        };
        let total: u64 = (0..vocab).map(|i| u64::from(weight(i))).sum();
        radix_select(vocab, mass_target(params.top_p, total), |i| {
            (keys[i], weight(i))
        })
    } else {
        0
    };
    let value_key = top_k_key.max(top_p_key);

    // Top-k, top-p and min-p (relative to the most likely token, which the first two
    // always keep) are thresholds on the value; typical-p then ranks what they keep by
    // how far their surprise is from the entropy.
    let in_value_range =
        |i: usize| w[i] > f32::NEG_INFINITY && keys[i] >= value_key && e[i] >= params.min_p;
    let typical = params.typical_p < 1.0;
    let (mut log_sum, mut entropy) = (0f32, 0f32);
    let mut typical_key = 0;
    if typical {
        let (mut sum, mut weighted, mut total) = (0f32, 0f32, 0u64);
        for i in (0..vocab).filter(|&i| in_value_range(i)) {
            sum += e[i];
            weighted += e[i] * (w[i] - max);
            total += u64::from(mass_of(e[i]));
        }
        log_sum = sum.ln();
        entropy = log_sum - weighted / sum;
        let gap_key = |i: usize| !order_key((log_sum - (w[i] - max) - entropy).abs());
        typical_key = radix_select(vocab, mass_target(params.typical_p, total), |i| {
            let weight = if in_value_range(i) { mass_of(e[i]) } else { 0 };
            (gap_key(i), weight)
        });
    }
    let gap_key = |i: usize| !order_key((log_sum - (w[i] - max) - entropy).abs());
    let kept = |i: usize| in_value_range(i) && (!typical || gap_key(i) >= typical_key);

    // The draw: the largest e / E over the kept tokens, E ~ Exp(1) from the token's own
    // counter (token i wins with probability e_i / sum e); greedy: the largest logit.
    // The lowest index wins a tie.
    let mut kept_sum = 0f32;
    let mut best = (f32::NEG_INFINITY, vocab);
    for group in (0..vocab).step_by(4) {
        let random = if params.do_sample {
            philox([(group / 4) as u32, inputs.step, 0, 0], params.seed)
        } else {
            [0; 4]
        };
        for (j, &bits) in random.iter().enumerate() {
            let i = group + j;
            if i >= vocab || !kept(i) {
                continue;
            }
            kept_sum += e[i];
            let key = if params.do_sample {
                e[i] / -uniform(bits).ln()
            } else {
                w[i]
            };
            if key > best.0 {
                best = (key, i);
            }
        }
    }
    let log_kept_sum = kept_sum.ln();
    let logprob = |i: usize| w[i] - max - log_kept_sum;
    let id = best.1;
    if id == vocab {
        // The most likely token is always kept: unreachable but for NaN arithmetic.
        return Choice {
            id: 0,
            logprob: f32::NAN,
            top: vec![],
        };
    }

    let mut top: Vec<usize> = Vec::new();
    if inputs.top_n > 0 {
        top = (0..vocab).filter(|&i| kept(i)).collect();
        let by_likelihood = |a: &usize, b: &usize| w[*b].total_cmp(&w[*a]).then(a.cmp(b));
        if inputs.top_n < top.len() {
            top.select_nth_unstable_by(inputs.top_n - 1, by_likelihood);
            top.truncate(inputs.top_n);
        }
        top.sort_unstable_by(by_likelihood);
    }
    Choice {
        id: id as u32,
        logprob: logprob(id),
        top: top.into_iter().map(|i| (i as u32, logprob(i))).collect(),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    pub fn choose(logits: &[f32], params: &SamplingParams, step: u32, top_n: usize) -> Choice {
        choose_row(
            logits,
            params,
            &RowInputs {
                penalties: &[],
                step,
                top_n,
                allowed: None,
            },
        )
    }

    /// The tokens a row keeps, read through the alternatives (all of them).
    pub fn kept_set(logits: &[f32], params: &SamplingParams) -> Vec<u32> {
        let mut ids: Vec<u32> = choose(logits, params, 0, logits.len())
            .top
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The kept set by the textbook definition (sort, then cut), on a distribution
    /// without ties: what the radix select must find.
    fn sorted_reference(logits: &[f32], params: &SamplingParams) -> Vec<u32> {
        let w: Vec<f64> = logits
            .iter()
            .map(|&x| f64::from(x) / f64::from(params.temperature))
            .collect();
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
        if params.top_k > 0 {
            order.truncate(params.top_k);
        }
        let max = w[order[0]];
        let p = |i: usize| (w[i] - max).exp();
        if params.top_p < 1.0 {
            let total: f64 = order.iter().map(|&i| p(i)).sum();
            let mut mass = 0.0;
            let keep = order
                .iter()
                .position(|&i| {
                    mass += p(i);
                    mass >= f64::from(params.top_p) * total
                })
                .unwrap();
            order.truncate(keep + 1);
        }
        if params.min_p > 0.0 {
            order.retain(|&i| p(i) >= f64::from(params.min_p));
        }
        let mut kept: Vec<u32> = order.into_iter().map(|i| i as u32).collect();
        kept.sort_unstable();
        kept
    }

    fn random_logits(rng: &mut StdRng, vocab: usize, scale: f32) -> Vec<f32> {
        (0..vocab)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect()
    }

    #[test]
    fn radix_select_finds_the_kth_largest_and_the_mass_threshold() {
        let keys = [5u32, 9, 1, 9, 7, 3];
        // k = 1, 2: both 9s; k = 3: 7.
        assert_eq!(radix_select(6, 1, |i| (keys[i], 1)), 9);
        assert_eq!(radix_select(6, 2, |i| (keys[i], 1)), 9);
        assert_eq!(radix_select(6, 3, |i| (keys[i], 1)), 7);
        assert_eq!(radix_select(6, 6, |i| (keys[i], 1)), 1);
        assert_eq!(radix_select(6, 7, |i| (keys[i], 1)), 0);
        // Weighted: 9s weigh 1 each, 7 weighs 10.
        let weights = [1u32, 1, 1, 1, 10, 1];
        assert_eq!(radix_select(6, 3, |i| (keys[i], weights[i])), 7);
        let big = [0x8000_0001u32, 0x7fff_ffff, 0xffff_fffe];
        assert_eq!(radix_select(3, 2, |i| (big[i], 1)), 0x8000_0001);
    }

    #[test]
    fn filters_keep_the_sorted_definitions_sets() {
        let mut rng = StdRng::seed_from_u64(11);
        for case in 0..60 {
            let vocab = [50, 1_000, 4_099][case % 3];
            let logits = random_logits(&mut rng, vocab, 8.0);
            let params = SamplingParams {
                temperature: [1.0, 0.7, 1.3][case % 3],
                top_k: [0, 5, 40, vocab + 1][case % 4],
                top_p: [1.0, 0.9, 0.5, 0.99, 0.3][case % 5],
                min_p: [0.0, 0.0, 0.05][case % 3],
                do_sample: true,
                ..Default::default()
            };
            assert_eq!(
                kept_set(&logits, &params),
                sorted_reference(&logits, &params),
                "case {case}: {params:?}"
            );
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
        assert_eq!(kept_set(&logits, &params), vec![1, 2]);
        let all = SamplingParams {
            typical_p: 0.95,
            ..Default::default()
        };
        assert_eq!(kept_set(&logits, &all), vec![0, 1, 2, 3]);
    }

    #[test]
    fn penalties_rewrite_the_logits_they_name() {
        let logits = [4.0f32, -1.0, 3.0, 2.0];
        let params = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 1.0,
            ..Default::default()
        };
        // Token 0 seen in the prompt: 4 / 2 = 2; token 1 generated twice: -1 * 2 - (0.5 * 2 + 1) = -4;
        // token 2 untouched (3) wins.
        let inputs = RowInputs {
            penalties: &[(0, 0), (1, 2), (99, 1)],
            step: 0,
            top_n: 4,
            allowed: None,
        };
        let choice = choose_row(&logits, &params, &inputs);
        assert_eq!(choice.id, 2);
        let order: Vec<u32> = choice.top.iter().map(|t| t.0).collect();
        assert_eq!(order, vec![2, 0, 3, 1]);
        let expected = [3.0f32, 2.0, 2.0, -4.0];
        let log_sum = expected.iter().map(|l| (l - 3.0).exp()).sum::<f32>().ln();
        assert!((choice.top[3].1 - (-4.0 - 3.0 - log_sum)).abs() < 1e-5);
    }

    #[test]
    fn greedy_takes_the_lowest_index_of_equal_maxima_and_reports_its_logprob() {
        let logits = [1.0f32, 3.0, 3.0, -f32::INFINITY, f32::NAN];
        let choice = choose(&logits, &SamplingParams::default(), 0, 0);
        assert_eq!(choice.id, 1);
        let log_sum = (2f32 + (-2f32).exp()).ln();
        assert!((choice.logprob + log_sum).abs() < 1e-6);
        let empty = choose(&[f32::NEG_INFINITY; 3], &SamplingParams::default(), 0, 2);
        assert!(empty.logprob.is_nan() && empty.id == 0);
    }

    #[test]
    fn a_seed_and_step_fix_the_draw_and_draws_follow_the_distribution() {
        let probs = [0.5f32, 0.3, 0.15, 0.05];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let params = SamplingParams {
            do_sample: true,
            seed: 42,
            ..Default::default()
        };
        let draws: Vec<u32> = (0..4_000).map(|step| choose(&logits, &params, step, 0).id).collect();
        let again: Vec<u32> = (0..4_000).map(|step| choose(&logits, &params, step, 0).id).collect();
        assert_eq!(draws, again);
        let other_seed = SamplingParams { seed: 7, ..params.clone() };
        assert_ne!(draws[..50], (0..50).map(|s| choose(&logits, &other_seed, s, 0).id).collect::<Vec<_>>()[..]);
        // Pearson's chi-square with 3 degrees of freedom: 16.27 is its 0.999 quantile
        // (fixed seed: the statistic is a fixed number, not a flaky one).
        let chi_square: f64 = probs
            .iter()
            .enumerate()
            .map(|(id, &p)| {
                let observed = draws.iter().filter(|&&d| d as usize == id).count() as f64;
                let expected = f64::from(p) * draws.len() as f64;
                (observed - expected).powi(2) / expected
            })
            .sum();
        assert!(chi_square < 16.27, "chi-square {chi_square}");
    }

    #[test]
    fn a_forbidden_token_is_never_chosen_however_likely() {
        let mut rng = StdRng::seed_from_u64(11);
        let vocab = 1_000;
        // Token 7 towers over the others; only 3, 500 and 999 are allowed.
        let mut logits: Vec<f32> = (0..vocab).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        logits[7] = 50.0;
        let allowed = grammar::TokenMask::of(vocab, [3, 500, 999]);
        let inputs = |step| RowInputs { penalties: &[(7, 3)], step, top_n: 5, allowed: Some(&allowed) };
        let greedy = choose_row(&logits, &SamplingParams { repetition_penalty: 1.1, ..Default::default() }, &inputs(0));
        let best = [3, 500, 999].into_iter().max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        assert_eq!(greedy.id as usize, best);
        // The alternatives are the allowed tokens only, and their probabilities add up to 1.
        assert_eq!(greedy.top.len(), 3);
        assert!(greedy.top.iter().all(|(id, _)| [3, 500, 999].contains(id)));
        assert!((greedy.top.iter().map(|(_, lp)| lp.exp()).sum::<f32>() - 1.0).abs() < 1e-5);
        let sampled = SamplingParams { do_sample: true, seed: 5, temperature: 2.0, ..Default::default() };
        for step in 0..500 {
            assert!(allowed.allows(choose_row(&logits, &sampled, &inputs(step)).id));
        }
    }

    #[test]
    fn sampling_never_picks_a_filtered_token() {
        let params = SamplingParams {
            do_sample: true,
            top_k: 1,
            seed: 3,
            ..Default::default()
        };
        for step in 0..50 {
            let choice = choose(&[1.0, 1.5, 0.5], &params, step, 0);
            assert_eq!((choice.id, choice.logprob), (1, 0.0));
        }
    }
}
