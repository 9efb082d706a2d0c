//! Property tests of the validation: any parameters, any prompt, any JSON body give a
//! valid request or a `ValidationError`, never a panic, and what passes is in range.

use super::params::{check_parameters, with_model_defaults};
use super::tests::validation;
use super::ValidationLimits;
use crate::api::generate::{GenerateParameters, GenerateRequest};
use model_store::SamplingDefaults;
use proptest::prelude::*;

const LIMITS: ValidationLimits =
    ValidationLimits { max_input_tokens: 6, max_total_tokens: 10, max_stop_sequences: 2, max_top_n_tokens: 3 };

fn config() -> ProptestConfig {
    // Bounded, and no regression files written into the source tree.
    ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() }
}

/// Any f32, the troublesome ones (NaN, infinities, zero, extremes) often.
fn any_float() -> impl Strategy<Value = Option<f32>> {
    let special = prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(0.0),
        Just(-0.0),
        Just(1.0),
        Just(f32::MAX),
        Just(f32::MIN_POSITIVE),
    ];
    proptest::option::of(prop_oneof![special, any::<f32>(), -3.0f32..3.0])
}

fn any_count() -> impl Strategy<Value = Option<u32>> {
    proptest::option::of(prop_oneof![Just(0), Just(u32::MAX), Just(u32::MAX - 1), 0u32..20, any::<u32>()])
}

prop_compose! {
    fn any_parameters()(
        floats in proptest::collection::vec(any_float(), 7),
        counts in proptest::collection::vec(any_count(), 4),
        top_k in proptest::option::of(any::<i32>()),
        seed in proptest::option::of(any::<u64>()),
        stop in proptest::collection::vec(".{0,3}", 0..4),
        flags in any::<(bool, bool, bool)>(),
    ) -> GenerateParameters {
        GenerateParameters {
            temperature: floats[0],
            repetition_penalty: floats[1],
            frequency_penalty: floats[2],
            presence_penalty: floats[3],
            top_p: floats[4],
            typical_p: floats[5],
            min_p: floats[6],
            best_of: counts[0],
            max_new_tokens: counts[1],
            truncate: counts[2],
            top_n_tokens: counts[3],
            top_k,
            seed,
            stop,
            do_sample: flags.0,
            watermark: flags.1,
            decoder_input_details: flags.2,
            ..GenerateParameters::default()
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn accepted_parameters_are_in_range(p in any_parameters()) {
        if let Ok(c) = check_parameters(&p, &LIMITS) {
            let s = &c.sampling;
            prop_assert!(s.temperature.is_finite() && s.temperature > 0.0);
            prop_assert!(s.top_p > 0.0 && s.top_p <= 1.0);
            prop_assert!(s.typical_p > 0.0 && s.typical_p <= 1.0);
            prop_assert!((0.0..=1.0).contains(&s.min_p));
            prop_assert!(s.seed <= i64::MAX as u64);
            prop_assert!(s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0);
            prop_assert!((-2.0..=2.0).contains(&s.frequency_penalty));
            prop_assert!((-2.0..=2.0).contains(&s.presence_penalty));
            prop_assert!(c.stop_sequences.len() <= LIMITS.max_stop_sequences);
            prop_assert!(c.stop_sequences.iter().all(|s| !s.is_empty()));
            prop_assert!(c.top_n_tokens <= LIMITS.max_top_n_tokens);
            prop_assert!(c.max_new_tokens != Some(0));
            prop_assert!(c.truncate.is_none_or(|t| t > 0 && t <= LIMITS.max_input_tokens));
        }
    }

    #[test]
    fn model_defaults_change_sampled_tgi_requests_only(p in any_parameters()) {
        let defaults = SamplingDefaults {
            temperature: Some(0.6),
            top_p: Some(0.9),
            top_k: Some(20),
            min_p: Some(0.05),
            repetition_penalty: Some(1.1),
        };
        let with = check_parameters(&with_model_defaults(&p, &defaults), &LIMITS);
        let without = check_parameters(&p, &LIMITS);
        match (&with, &without) {
            (Ok(with), Ok(without)) if !without.sampling.do_sample => prop_assert_eq!(with, without),
            (Ok(with), Ok(_)) => prop_assert!(with.sampling.do_sample),
            // Valid defaults fill unset fields only: a request fails alike with them or without.
            _ => prop_assert_eq!(with.as_ref().err(), without.as_ref().err()),
        }
    }

    #[test]
    fn accepted_requests_fit_the_limits(
        words in proptest::collection::vec(prop_oneof![Just("the"), Just("capital"), Just("of"), Just(" "), Just("\u{200b}"), Just("é")], 0..12),
        max_new_tokens in any_count(),
        truncate in any_count(),
    ) {
        let inputs = words.join(" ");
        let parameters = GenerateParameters { max_new_tokens, truncate, ..GenerateParameters::default() };
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let checked = runtime.block_on(validation(LIMITS.max_input_tokens, LIMITS.max_total_tokens).validate(inputs, &parameters, true));
        if let Ok(request) = checked {
            let input_length = request.input_ids.len() as u64;
            let new_tokens = u64::from(request.stopping_parameters.max_new_tokens);
            prop_assert!(input_length > 0 && input_length <= u64::from(LIMITS.max_input_tokens));
            prop_assert!(new_tokens > 0);
            prop_assert!(input_length + new_tokens <= u64::from(LIMITS.max_total_tokens), "{input_length} + {new_tokens}");
        }
    }

    #[test]
    fn any_body_parses_or_is_rejected(body in prop_oneof![
        any::<Vec<u8>>(),
        r#"\{"inputs": ?"[^"]{0,8}"?, ?"parameters": ?\{("[a-z_]{1,16}": ?(-?[0-9e.]{1,12}|null|true|"x"|\[\]),? ?){0,3}\}?\}?"#
            .prop_map(String::into_bytes),
    ]) {
        // Only that it returns: serde's errors become 400/422 in the HTTP layer.
        let _ = serde_json::from_slice::<GenerateRequest>(&body);
    }
}
