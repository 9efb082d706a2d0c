//! Range checks of the sampling and stopping parameters (no tokenizer needed), and the
//! model's sampling defaults for what a sampled TGI request leaves unset.

use super::{ValidationError, ValidationLimits};
use crate::api::generate::GenerateParameters;
use crate::api::neutral_only;
use crate::infer_types::ValidParameters;
use model_store::SamplingDefaults;

/// JSON clients and the OpenAPI description (int64) agree on signed 64-bit seeds.
const MAX_SEED: u64 = i64::MAX as u64;

/// The parameters that passed every check, before the prompt length is known.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedParameters {
    pub sampling: ValidParameters,
    pub stop_sequences: Vec<String>,
    /// `None`: as many as the context leaves.
    pub max_new_tokens: Option<u32>,
    pub truncate: Option<u32>,
    pub top_n_tokens: u32,
}

fn check<T: Copy + Into<f64>>(
    name: &'static str,
    value: Option<T>,
    valid: impl Fn(f64) -> bool,
    expected: &'static str,
) -> Result<Option<T>, ValidationError> {
    match value {
        Some(v) if !(v.into().is_finite() && valid(v.into())) => Err(ValidationError::OutOfRange { name, expected }),
        _ => Ok(value),
    }
}

/// The warpers that cut the distribution down before a token is drawn, checked.
pub struct Warpers {
    pub top_k: Option<i32>,
    /// `None` for 1 (no filtering).
    pub top_p: Option<f32>,
    pub typical_p: Option<f32>,
    /// `None` for 0 (no filtering).
    pub min_p: Option<f32>,
}

/// The range checks of the warpers; also for OpenAI's greedy requests, which ignore
/// them but, as vLLM does, still reject values out of range.
pub fn check_warpers(p: &GenerateParameters) -> Result<Warpers, ValidationError> {
    Ok(Warpers {
        top_k: check("top_k", p.top_k, |v| v > 0.0, "strictly positive")?,
        top_p: check("top_p", p.top_p, |v| v > 0.0 && v <= 1.0, "in (0, 1]")?.filter(|&v| v < 1.0),
        typical_p: check("typical_p", p.typical_p, |v| v > 0.0 && v < 1.0, "in (0, 1)")?,
        min_p: check("min_p", p.min_p, |v| (0.0..=1.0).contains(&v), "in [0, 1]")?.filter(|&v| v > 0.0),
    })
}

/// Whether the request samples. As TGI's shards do: any warper turns sampling on.
/// (Values out of range count too: they are rejected afterwards.)
fn samples(p: &GenerateParameters) -> bool {
    p.do_sample
        || p.temperature.is_some_and(|t| t != 1.0)
        || p.top_k.is_some()
        || p.top_p.is_some_and(|v| v != 1.0)
        || p.typical_p.is_some()
        || p.min_p.is_some_and(|v| v != 0.0)
}

/// The TGI routes' rule for the model's sampling defaults: a request that samples takes
/// them for its unset fields; a greedy one stays as it is (so a bare `/generate` stays
/// greedy, as in TGI). The OpenAI routes follow vLLM's instead (`OpenAiSampling`).
pub fn with_model_defaults(p: &GenerateParameters, defaults: &SamplingDefaults) -> GenerateParameters {
    if !samples(p) {
        return p.clone();
    }
    GenerateParameters {
        temperature: p.temperature.or(defaults.temperature),
        top_p: p.top_p.or(defaults.top_p),
        top_k: p.top_k.or(defaults.top_k),
        min_p: p.min_p.or(defaults.min_p),
        repetition_penalty: p.repetition_penalty.or(defaults.repetition_penalty),
        ..p.clone()
    }
}

/// The model's defaults, if they pass the checks a request's values pass (checked once, at
/// startup, so that a model's odd generation_config.json cannot fail every request).
pub fn check_defaults(
    defaults: SamplingDefaults,
    limits: &ValidationLimits,
) -> Result<SamplingDefaults, ValidationError> {
    let SamplingDefaults { temperature, top_p, top_k, min_p, repetition_penalty } = defaults;
    let as_request = GenerateParameters { temperature, top_p, top_k, min_p, repetition_penalty, ..Default::default() };
    check_parameters(&as_request, limits).map(|_| defaults)
}

pub fn check_parameters(p: &GenerateParameters, limits: &ValidationLimits) -> Result<CheckedParameters, ValidationError> {
    neutral_only::check(p.neutral_only())?;
    check("best_of", p.best_of, |v| v == 1.0, "1 (best_of is not supported)")?;
    if p.watermark {
        return Err(ValidationError::OutOfRange {
            name: "watermark",
            expected: "false (watermarking is not supported)",
        });
    }
    let temperature = check("temperature", p.temperature, |v| v > 0.0, "strictly positive")?;
    let repetition_penalty = check("repetition_penalty", p.repetition_penalty, |v| v > 0.0, "strictly positive")?;
    let penalty = |v: f64| (-2.0..=2.0).contains(&v);
    let frequency_penalty = check("frequency_penalty", p.frequency_penalty, penalty, "in [-2, 2]")?;
    let presence_penalty = check("presence_penalty", p.presence_penalty, penalty, "in [-2, 2]")?;
    let Warpers { top_k, top_p, typical_p, min_p } = check_warpers(p)?;
    let max_new_tokens = check("max_new_tokens", p.max_new_tokens, |v| v > 0.0, "strictly positive")?;
    let truncate = check("truncate", p.truncate, |v| v > 0.0, "strictly positive")?;
    if p.seed.is_some_and(|seed| seed > MAX_SEED) {
        return Err(ValidationError::OutOfRange { name: "seed", expected: "at most 2^63 - 1" });
    }
    if let Some(truncate) = truncate {
        if truncate > limits.max_input_tokens {
            return Err(ValidationError::Truncate { truncate, max_input_tokens: limits.max_input_tokens });
        }
    }

    if p.stop.len() > limits.max_stop_sequences {
        return Err(ValidationError::StopSequences { count: p.stop.len(), max: limits.max_stop_sequences });
    }
    // An empty stop sequence would match before any token: it means nothing.
    let stop_sequences = p.stop.iter().filter(|s| !s.is_empty()).cloned().collect();
    let top_n_tokens = p.top_n_tokens.unwrap_or(0);
    if top_n_tokens > limits.max_top_n_tokens {
        return Err(ValidationError::TopNTokens { value: top_n_tokens, max: limits.max_top_n_tokens });
    }

    let do_sample = samples(p);
    let seed = match p.seed {
        Some(seed) => seed,
        // Within the accepted range: the seed reported back must be one a client can send.
        None if do_sample => rand::random_range(0..=MAX_SEED),
        None => 0,
    };
    Ok(CheckedParameters {
        sampling: ValidParameters {
            temperature: temperature.unwrap_or(1.0),
            top_k: top_k.map_or(0, |k| k as u32),
            top_p: top_p.unwrap_or(1.0),
            typical_p: typical_p.unwrap_or(1.0),
            min_p: min_p.unwrap_or(0.0),
            do_sample,
            seed,
            repetition_penalty: repetition_penalty.unwrap_or(1.0),
            frequency_penalty: frequency_penalty.unwrap_or(0.0),
            presence_penalty: presence_penalty.unwrap_or(0.0),
        },
        stop_sequences,
        max_new_tokens,
        truncate,
        top_n_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ValidationLimits =
        ValidationLimits { max_input_tokens: 10, max_total_tokens: 20, max_stop_sequences: 2, max_top_n_tokens: 3 };

    fn checked(p: GenerateParameters) -> Result<CheckedParameters, ValidationError> {
        check_parameters(&p, &LIMITS)
    }

    /// Llama-3.1-Instruct's generation_config.json, and a repetition penalty.
    const LLAMA_DEFAULTS: SamplingDefaults = SamplingDefaults {
        temperature: Some(0.6),
        top_p: Some(0.9),
        top_k: None,
        min_p: None,
        repetition_penalty: Some(1.1),
    };

    fn out_of_range(result: Result<CheckedParameters, ValidationError>) -> &'static str {
        match result {
            Err(ValidationError::OutOfRange { name, .. }) => name,
            other => panic!("expected OutOfRange, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_greedy_and_disabled() {
        let c = checked(GenerateParameters::default()).unwrap();
        assert!(!c.sampling.do_sample);
        assert_eq!(c.sampling.seed, 0);
        assert_eq!((c.sampling.temperature, c.sampling.top_k, c.sampling.top_p, c.sampling.min_p), (1.0, 0, 1.0, 0.0));
        assert_eq!((c.sampling.repetition_penalty, c.sampling.frequency_penalty), (1.0, 0.0));
        assert_eq!(c.max_new_tokens, Some(100));
        assert_eq!(c.top_n_tokens, 0);
    }

    #[test]
    fn warpers_enable_sampling() {
        let c = checked(GenerateParameters { top_k: Some(5), seed: Some(7), ..Default::default() }).unwrap();
        assert!(c.sampling.do_sample);
        assert_eq!((c.sampling.top_k, c.sampling.seed), (5, 7));
        // top_p = 1 is "disabled", not a warper.
        let c = checked(GenerateParameters { top_p: Some(1.0), ..Default::default() }).unwrap();
        assert!(!c.sampling.do_sample);
    }

    #[test]
    fn min_p_is_a_warper_and_zero_disables_it() {
        let c = checked(GenerateParameters { min_p: Some(0.1), ..Default::default() }).unwrap();
        assert!(c.sampling.do_sample);
        assert_eq!(c.sampling.min_p, 0.1);
        for min_p in [None, Some(0.0)] {
            let c = checked(GenerateParameters { min_p, ..Default::default() }).unwrap();
            assert!(!c.sampling.do_sample);
            assert_eq!(c.sampling.min_p, 0.0);
        }
        assert_eq!(checked(GenerateParameters { min_p: Some(1.0), ..Default::default() }).unwrap().sampling.min_p, 1.0);
    }

    #[test]
    fn unseeded_sampled_requests_draw_a_seed_they_could_send() {
        let sampled = GenerateParameters { do_sample: true, ..Default::default() };
        let seeds: Vec<u64> = (0..64).map(|_| checked(sampled.clone()).unwrap().sampling.seed).collect();
        assert!(seeds.iter().any(|&seed| seed != seeds[0]), "a fresh seed per request");
        for seed in seeds {
            let resent = checked(GenerateParameters { seed: Some(seed), ..sampled.clone() }).unwrap();
            assert_eq!(resent.sampling.seed, seed);
        }
    }

    #[test]
    fn model_defaults_fill_the_unset_fields_of_sampled_requests_only() {
        let with_llama = |p: GenerateParameters| checked(with_model_defaults(&p, &LLAMA_DEFAULTS)).unwrap().sampling;
        let greedy = with_llama(GenerateParameters { repetition_penalty: Some(1.0), ..Default::default() });
        assert!(!greedy.do_sample);
        assert_eq!((greedy.temperature, greedy.top_p, greedy.repetition_penalty), (1.0, 1.0, 1.0));
        assert_eq!(greedy, with_llama(GenerateParameters::default()));

        let sampled = with_llama(GenerateParameters { do_sample: true, ..Default::default() });
        assert!(sampled.do_sample);
        assert_eq!((sampled.temperature, sampled.top_p, sampled.repetition_penalty), (0.6, 0.9, 1.1));
        // The request's own values win; a warper alone turns sampling (and the defaults) on.
        let own = with_llama(GenerateParameters { top_k: Some(5), top_p: Some(1.0), ..Default::default() });
        assert!(own.do_sample);
        assert_eq!((own.temperature, own.top_k, own.top_p), (0.6, 5, 1.0));
    }

    #[test]
    fn model_defaults_are_checked_like_request_values() {
        assert_eq!(check_defaults(LLAMA_DEFAULTS, &LIMITS), Ok(LLAMA_DEFAULTS));
        let zero_temperature = SamplingDefaults { temperature: Some(0.0), ..LLAMA_DEFAULTS };
        assert!(matches!(
            check_defaults(zero_temperature, &LIMITS),
            Err(ValidationError::OutOfRange { name: "temperature", .. })
        ));
        let negative_top_k = SamplingDefaults { top_k: Some(-1), ..LLAMA_DEFAULTS };
        assert!(matches!(check_defaults(negative_top_k, &LIMITS), Err(ValidationError::OutOfRange { name: "top_k", .. })));
    }

    #[test]
    fn rejects_out_of_range_and_non_finite_values() {
        let cases: Vec<(&str, GenerateParameters)> = vec![
            ("temperature", GenerateParameters { temperature: Some(0.0), ..Default::default() }),
            ("temperature", GenerateParameters { temperature: Some(f32::NAN), ..Default::default() }),
            ("temperature", GenerateParameters { temperature: Some(f32::INFINITY), ..Default::default() }),
            ("top_p", GenerateParameters { top_p: Some(0.0), ..Default::default() }),
            ("top_p", GenerateParameters { top_p: Some(1.5), ..Default::default() }),
            ("top_k", GenerateParameters { top_k: Some(0), ..Default::default() }),
            ("typical_p", GenerateParameters { typical_p: Some(1.0), ..Default::default() }),
            ("min_p", GenerateParameters { min_p: Some(1.5), ..Default::default() }),
            ("min_p", GenerateParameters { min_p: Some(-0.1), ..Default::default() }),
            ("min_p", GenerateParameters { min_p: Some(f32::NAN), ..Default::default() }),
            ("repetition_penalty", GenerateParameters { repetition_penalty: Some(-1.0), ..Default::default() }),
            ("frequency_penalty", GenerateParameters { frequency_penalty: Some(2.5), ..Default::default() }),
            ("presence_penalty", GenerateParameters { presence_penalty: Some(-3.0), ..Default::default() }),
            ("max_new_tokens", GenerateParameters { max_new_tokens: Some(0), ..Default::default() }),
            ("best_of", GenerateParameters { best_of: Some(2), ..Default::default() }),
            ("watermark", GenerateParameters { watermark: true, ..Default::default() }),
            ("seed", GenerateParameters { seed: Some(u64::MAX), ..Default::default() }),
            ("seed", GenerateParameters { seed: Some(1 << 63), ..Default::default() }),
        ];
        for (name, parameters) in cases {
            assert_eq!(out_of_range(checked(parameters)), name);
        }
    }

    #[test]
    fn drops_empty_stop_sequences() {
        let stop = vec![String::new(), "\n".to_string()];
        assert_eq!(checked(GenerateParameters { stop, ..Default::default() }).unwrap().stop_sequences, vec!["\n"]);
    }

    #[test]
    fn enforces_limits() {
        let stop = vec!["a".to_string(); 3];
        assert!(matches!(
            checked(GenerateParameters { stop, ..Default::default() }),
            Err(ValidationError::StopSequences { count: 3, max: 2 })
        ));
        assert!(matches!(
            checked(GenerateParameters { top_n_tokens: Some(4), ..Default::default() }),
            Err(ValidationError::TopNTokens { value: 4, max: 3 })
        ));
        assert!(matches!(
            checked(GenerateParameters { truncate: Some(11), ..Default::default() }),
            Err(ValidationError::Truncate { truncate: 11, max_input_tokens: 10 })
        ));
    }
}
