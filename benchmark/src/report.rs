//! The Markdown table of the results.

use crate::run::{Outcome, Results};
use std::fmt::Write;

pub fn markdown(results: &Results) -> String {
    let mut out = format!(
        "Shard microbenchmark: {} ({}, {}, {}), prompt {} tokens, {} decode steps, {} run(s), KV cache {} tokens\n\n",
        results.model_type,
        results.device_type,
        results.dtype,
        results.attention_impl,
        results.prompt_tokens,
        results.decode_steps,
        results.runs,
        results.max_supported_total_tokens
    );
    out.push_str("| batch | prefill ms (mean) | prefill ms (p99) | prefill tok/s | decode step ms (p50) | decode step ms (p99) | shard: forward / sampling / whole call ms (p50) | decode tok/s |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for batch in &results.batches {
        match &batch.outcome {
            Outcome::Measured(m) => {
                let (step_p50, step_p99) = m
                    .decode_step_ms
                    .as_ref()
                    .map_or(("-".into(), "-".into()), |s| (fmt(s.p50), fmt(s.p99)));
                let shard_parts = match (
                    &m.decode_forward_ms,
                    &m.decode_sampling_ms,
                    &m.decode_shard_ms,
                ) {
                    (Some(forward), Some(sampling), Some(call)) => {
                        format!(
                            "{} / {} / {}",
                            fmt(forward.p50),
                            fmt(sampling.p50),
                            fmt(call.p50)
                        )
                    }
                    _ => "-".into(),
                };
                let decode_rate = m.decode_tokens_per_s.map_or("-".into(), fmt);
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    batch.batch_size,
                    fmt(m.prefill_ms.mean),
                    fmt(m.prefill_ms.p99),
                    fmt(m.prefill_tokens_per_s),
                    step_p50,
                    step_p99,
                    shard_parts,
                    decode_rate
                );
            }
            Outcome::Skipped { reason } => {
                let _ = writeln!(
                    out,
                    "| {} | skipped: {reason} | | | | | | |",
                    batch.batch_size
                );
            }
        }
    }
    out
}

/// Three significant figures are plenty for timings that vary by a few percent.
fn fmt(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{BatchResult, Measurement};
    use crate::stats::Summary;

    #[test]
    fn table_has_a_row_per_batch_size() {
        let results = Results {
            model_type: "llama".into(),
            dtype: "bfloat16".into(),
            device_type: "cuda".into(),
            attention_impl: "paged".into(),
            quantization: "none".into(),
            block_size: 16,
            max_supported_total_tokens: 1000,
            prompt_tokens: 512,
            decode_steps: 2,
            runs: 1,
            batches: vec![
                BatchResult {
                    batch_size: 1,
                    outcome: Outcome::Measured(Box::new(Measurement {
                        prefill_calls: 1,
                        prefill_ms: Summary::of(&[20.0]).unwrap(),
                        prefill_tokens_per_s: 25600.0,
                        decode_step_ms: Summary::of(&[5.0, 7.0]).unwrap().into(),
                        decode_forward_ms: Summary::of(&[4.0, 6.0]).unwrap().into(),
                        decode_sampling_ms: Summary::of(&[0.5, 0.5]).unwrap().into(),
                        decode_shard_ms: Summary::of(&[5.0, 6.0]).unwrap().into(),
                        decode_tokens_per_s: Some(166.66),
                    })),
                },
                BatchResult {
                    batch_size: 256,
                    outcome: Outcome::Skipped {
                        reason: "too big".into(),
                    },
                },
            ],
        };
        let table = markdown(&results);
        assert!(
            table.contains("| 1 | 20.0 | 20.0 | 25600 | 6.00 | 6.98 | 5.00 / 0.50 / 5.50 | 167 |"),
            "{table}"
        );
        assert!(table.contains("| 256 | skipped: too big |"), "{table}");
        let json = serde_json::to_value(&results).unwrap();
        assert_eq!(json["batches"][0]["status"], "measured");
        assert_eq!(json["batches"][1]["status"], "skipped");
        assert_eq!(json["batches"][0]["decode_step_ms"]["p50"], 6.0);
    }
}
