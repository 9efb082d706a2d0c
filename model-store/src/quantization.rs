//! Which quantized format a checkpoint's linear weights are in: config.json's
//! `quantization_config` (as AutoAWQ, AutoGPTQ / GPTQModel, llm-compressor and FBGEMM
//! write it) and the `--quantize` choice (TGI's values). Everything the shard's loaders
//! do not read is refused here, naming the field.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde_json::Value;
use std::fmt;

/// `--quantize`: TGI's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    /// The checkpoint's AWQ weights (AutoAWQ, "gemm" layout).
    Awq,
    /// The checkpoint's GPTQ weights (AutoGPTQ / GPTQModel).
    Gptq,
    /// The checkpoint's GPTQ or AWQ weights, for Marlin's kernel: served as their own
    /// format.
    Marlin,
    /// The checkpoint's FP8 weights, or bf16/f16 weights quantized to FP8 E4M3 at load
    /// (per-channel scales).
    Fp8,
    /// NF4 at load (blocks of 64, absmax scales).
    BitsandbytesNf4,
    /// FP4 at load (blocks of 64, absmax scales).
    BitsandbytesFp4,
    /// int8 at load, LLM.int8()'s per-row absmax weights.
    Bitsandbytes,
}

impl fmt::Display for QuantizeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self.to_possible_value().expect("no skipped variants");
        f.write_str(value.get_name())
    }
}

/// The format of the linear layers' weights, checked against what the loaders read.
#[derive(Debug, Clone, PartialEq)]
pub enum Quantization {
    /// AutoAWQ's GEMM layout: 4-bit codes with zero points, groups along the inputs.
    Awq { group_size: usize },
    Gptq(GptqConfig),
    /// FP8 E4M3 weights with per-tensor or per-channel `weight_scale`, as stored.
    Fp8 { method: Fp8Method },
    /// Dense weights, quantized as they are loaded.
    AtLoad(LoadTimeFormat),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GptqConfig {
    /// 4 or 8.
    pub bits: u32,
    /// Input features per group; None for one group over all of them (`group_size: -1`).
    pub group_size: Option<usize>,
    /// Act-order: groups follow `g_idx`, not the input order.
    pub desc_act: bool,
    pub sym: bool,
    /// GPTQ v1 (`checkpoint_format: "gptq"`, the default) stores every zero point less one.
    pub zeros_less_one: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Method {
    CompressedTensors,
    Fbgemm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadTimeFormat {
    /// E4M3 with one scale per output feature.
    Fp8,
    /// bitsandbytes' NF4 (normal-float code book), blocks of 64.
    Nf4,
    /// bitsandbytes' FP4, blocks of 64.
    Fp4,
    /// int8 with one absmax scale per output feature.
    Int8,
}

/// bitsandbytes' block size: 64 consecutive weights share an absmax scale.
pub const BNB_BLOCK: usize = 64;

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Awq { group_size } => write!(f, "awq:4bit-g{group_size}"),
            Self::Gptq(g) => {
                write!(f, "gptq:{}bit-", g.bits)?;
                match g.group_size {
                    Some(size) => write!(f, "g{size}")?,
                    None => write!(f, "g-1")?,
                }
                if g.desc_act {
                    write!(f, "-act-order")?;
                }
                write!(f, "{}", if g.sym { "-sym" } else { "-asym" })
            }
            Self::Fp8 { method: Fp8Method::CompressedTensors } => write!(f, "fp8:compressed-tensors"),
            Self::Fp8 { method: Fp8Method::Fbgemm } => write!(f, "fp8:fbgemm"),
            Self::AtLoad(LoadTimeFormat::Fp8) => write!(f, "fp8:at-load"),
            Self::AtLoad(LoadTimeFormat::Nf4) => write!(f, "bitsandbytes-nf4"),
            Self::AtLoad(LoadTimeFormat::Fp4) => write!(f, "bitsandbytes-fp4"),
            Self::AtLoad(LoadTimeFormat::Int8) => write!(f, "bitsandbytes"),
        }
    }
}

/// The format of a safetensors checkpoint whose config.json is `config`, served with
/// `flag`; None for dense weights served as stored.
pub fn resolve(config: &Value, flag: Option<QuantizeArg>) -> Result<Option<Quantization>> {
    let Some(qc) = config.get("quantization_config").filter(|v| !v.is_null()) else {
        return match flag {
            None => Ok(None),
            Some(QuantizeArg::Fp8) => Ok(Some(Quantization::AtLoad(LoadTimeFormat::Fp8))),
            Some(QuantizeArg::BitsandbytesNf4) => Ok(Some(Quantization::AtLoad(LoadTimeFormat::Nf4))),
            Some(QuantizeArg::BitsandbytesFp4) => Ok(Some(Quantization::AtLoad(LoadTimeFormat::Fp4))),
            Some(QuantizeArg::Bitsandbytes) => Ok(Some(Quantization::AtLoad(LoadTimeFormat::Int8))),
            Some(f @ (QuantizeArg::Awq | QuantizeArg::Gptq | QuantizeArg::Marlin)) => bail!(
                "`--quantize {f}` needs a checkpoint quantized with {} (config.json's \
                 quantization_config); this one has none and {f} weights cannot be made at load: \
                 use `--quantize fp8`, `bitsandbytes-nf4`, `bitsandbytes-fp4` or `bitsandbytes`",
                match f {
                    QuantizeArg::Awq => "AWQ",
                    QuantizeArg::Gptq => "GPTQ",
                    _ => "GPTQ or AWQ",
                }
            ),
        };
    };
    let method = qc
        .get("quant_method")
        .and_then(Value::as_str)
        .context("config.json's quantization_config has no quant_method")?;
    let quantization = match method {
        "awq" => awq(qc)?,
        "gptq" => gptq(qc)?,
        "compressed-tensors" => compressed_tensors(qc)?,
        "fbgemm_fp8" => Quantization::Fp8 { method: Fp8Method::Fbgemm },
        "bitsandbytes" => bail!(
            "quantization_config.quant_method \"bitsandbytes\": checkpoints saved quantized by \
             bitsandbytes are not supported; serve the bf16/f16 checkpoint with \
             `--quantize bitsandbytes-nf4` (or -fp4, or bitsandbytes for int8)"
        ),
        other => bail!(
            "quantization_config.quant_method {other:?} is not supported (supported: awq, gptq, \
             compressed-tensors FP8, fbgemm_fp8)"
        ),
    };
    if let Some(flag) = flag {
        let agrees = matches!(
            (&quantization, flag),
            (Quantization::Awq { .. }, QuantizeArg::Awq | QuantizeArg::Marlin)
                | (Quantization::Gptq(_), QuantizeArg::Gptq | QuantizeArg::Marlin)
                | (Quantization::Fp8 { .. }, QuantizeArg::Fp8)
        );
        if !agrees {
            bail!(
                "`--quantize {flag}` contradicts the checkpoint: its config.json's \
                 quantization_config.quant_method is {method:?}; leave --quantize out to serve \
                 the checkpoint's format"
            );
        }
    }
    Ok(Some(quantization))
}

fn usize_field(qc: &Value, names: &[&str]) -> Result<Option<i64>> {
    for name in names {
        if let Some(v) = qc.get(*name).filter(|v| !v.is_null()) {
            return v
                .as_i64()
                .map(Some)
                .with_context(|| format!("quantization_config.{name} is not an integer: {v}"));
        }
    }
    Ok(None)
}

fn bool_field(qc: &Value, name: &str, default: bool) -> Result<bool> {
    match qc.get(name).filter(|v| !v.is_null()) {
        None => Ok(default),
        Some(v) => v
            .as_bool()
            .with_context(|| format!("quantization_config.{name} is not a boolean: {v}")),
    }
}

/// transformers' AwqConfig, or AutoAWQ's own keys (`w_bit`, `q_group_size`).
fn awq(qc: &Value) -> Result<Quantization> {
    let bits = usize_field(qc, &["bits", "w_bit"])?.unwrap_or(4);
    if bits != 4 {
        bail!("quantization_config.bits {bits} is not supported for AWQ (4)");
    }
    let group_size = usize_field(qc, &["group_size", "q_group_size"])?
        .context("AWQ quantization_config has no group_size")?;
    if !matches!(group_size, 64 | 128) {
        bail!("quantization_config.group_size {group_size} is not supported for AWQ (64 or 128)");
    }
    if !bool_field(qc, "zero_point", true)? {
        bail!("quantization_config.zero_point false is not supported for AWQ (true)");
    }
    let version = qc.get("version").and_then(Value::as_str).unwrap_or("gemm");
    if !version.eq_ignore_ascii_case("gemm") {
        bail!(
            "quantization_config.version {version:?} is not supported for AWQ (\"gemm\", \
             AutoAWQ's default layout)"
        );
    }
    Ok(Quantization::Awq { group_size: group_size as usize })
}

fn gptq(qc: &Value) -> Result<Quantization> {
    let bits = usize_field(qc, &["bits"])?.context("GPTQ quantization_config has no bits")?;
    if !matches!(bits, 4 | 8) {
        bail!("quantization_config.bits {bits} is not supported for GPTQ (4 or 8)");
    }
    let group_size = match usize_field(qc, &["group_size"])?.unwrap_or(128) {
        -1 => None,
        g @ (32 | 64 | 128) => Some(g as usize),
        g => bail!("quantization_config.group_size {g} is not supported for GPTQ (32, 64, 128 or -1)"),
    };
    let zeros_less_one = match qc.get("checkpoint_format").and_then(Value::as_str).unwrap_or("gptq") {
        "gptq" => true,
        "gptq_v2" => false,
        other => bail!(
            "quantization_config.checkpoint_format {other:?} is not supported for GPTQ \
             (\"gptq\" or \"gptq_v2\")"
        ),
    };
    if bool_field(qc, "lm_head", false)? {
        bail!("quantization_config.lm_head true (a quantized lm_head) is not supported for GPTQ");
    }
    Ok(Quantization::Gptq(GptqConfig {
        bits: bits as u32,
        group_size,
        desc_act: bool_field(qc, "desc_act", false)?,
        sym: bool_field(qc, "sym", true)?,
        zeros_less_one,
    }))
}

/// llm-compressor's FP8: E4M3 weights, per-tensor or per-channel scales; activations
/// (dynamic per-token or static) are taken in the activation dtype.
fn compressed_tensors(qc: &Value) -> Result<Quantization> {
    let format = qc.get("format").and_then(Value::as_str).unwrap_or("float-quantized");
    if !matches!(format, "float-quantized" | "naive-quantized") {
        bail!(
            "quantization_config.format {format:?} is not supported for compressed-tensors \
             (\"float-quantized\": FP8 weights)"
        );
    }
    let groups = qc
        .get("config_groups")
        .and_then(Value::as_object)
        .context("compressed-tensors quantization_config has no config_groups")?;
    for (name, group) in groups {
        let field = |f: &str| format!("quantization_config.config_groups.{name}.weights.{f}");
        let weights = group
            .get("weights")
            .with_context(|| format!("quantization_config.config_groups.{name} has no weights"))?;
        let num_bits = weights.get("num_bits").and_then(Value::as_i64);
        let kind = weights.get("type").and_then(Value::as_str);
        if num_bits != Some(8) || kind != Some("float") {
            bail!(
                "{} {num_bits:?} of type {kind:?} is not supported for compressed-tensors \
                 (8-bit float weights)",
                field("num_bits")
            );
        }
        let strategy = weights.get("strategy").and_then(Value::as_str).unwrap_or("tensor");
        if !matches!(strategy, "tensor" | "channel") {
            bail!("{} {strategy:?} is not supported (\"tensor\" or \"channel\")", field("strategy"));
        }
        if weights.get("dynamic").and_then(Value::as_bool) == Some(true) {
            bail!("{} true is not supported (weights need stored scales)", field("dynamic"));
        }
    }
    Ok(Quantization::Fp8 { method: Fp8Method::CompressedTensors })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with(qc: Value) -> Value {
        json!({ "model_type": "llama", "quantization_config": qc })
    }

    fn err(config: Value, flag: Option<QuantizeArg>) -> String {
        format!("{:#}", resolve(&config, flag).unwrap_err())
    }

    #[test]
    fn reads_each_format() {
        let awq = with(json!({"quant_method": "awq", "bits": 4, "group_size": 128,
                              "zero_point": true, "version": "gemm"}));
        assert_eq!(resolve(&awq, None).unwrap(), Some(Quantization::Awq { group_size: 128 }));
        assert_eq!(resolve(&awq, Some(QuantizeArg::Marlin)).unwrap(), Some(Quantization::Awq { group_size: 128 }));
        let autoawq = with(json!({"quant_method": "awq", "w_bit": 4, "q_group_size": 64}));
        assert_eq!(resolve(&autoawq, Some(QuantizeArg::Awq)).unwrap(), Some(Quantization::Awq { group_size: 64 }));
        let gptq = with(json!({"quant_method": "gptq", "bits": 8, "group_size": -1,
                               "desc_act": true, "sym": false, "checkpoint_format": "gptq_v2"}));
        let q = resolve(&gptq, Some(QuantizeArg::Gptq)).unwrap().unwrap();
        assert_eq!(
            q,
            Quantization::Gptq(GptqConfig { bits: 8, group_size: None, desc_act: true, sym: false, zeros_less_one: false })
        );
        assert_eq!(q.to_string(), "gptq:8bit-g-1-act-order-asym");
        let fp8 = with(json!({"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": false},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true}}},
            "ignore": ["lm_head"]}));
        assert_eq!(resolve(&fp8, Some(QuantizeArg::Fp8)).unwrap(), Some(Quantization::Fp8 { method: Fp8Method::CompressedTensors }));
        let fbgemm = with(json!({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}));
        assert_eq!(resolve(&fbgemm, None).unwrap(), Some(Quantization::Fp8 { method: Fp8Method::Fbgemm }));
        let dense = json!({"model_type": "llama"});
        assert_eq!(resolve(&dense, None).unwrap(), None);
        for (flag, format) in [
            (QuantizeArg::Fp8, LoadTimeFormat::Fp8),
            (QuantizeArg::BitsandbytesNf4, LoadTimeFormat::Nf4),
            (QuantizeArg::BitsandbytesFp4, LoadTimeFormat::Fp4),
            (QuantizeArg::Bitsandbytes, LoadTimeFormat::Int8),
        ] {
            assert_eq!(resolve(&dense, Some(flag)).unwrap(), Some(Quantization::AtLoad(format)));
        }
    }

    #[test]
    fn unsupported_fields_are_named() {
        let e = err(with(json!({"quant_method": "hqq"})), None);
        assert!(e.contains("quant_method \"hqq\""), "{e}");
        let e = err(with(json!({"quant_method": "awq", "bits": 4, "group_size": 32})), None);
        assert!(e.contains("group_size 32"), "{e}");
        let e = err(with(json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"})), None);
        assert!(e.contains("version \"gemv\""), "{e}");
        let e = err(with(json!({"quant_method": "gptq", "bits": 3, "group_size": 128})), None);
        assert!(e.contains("bits 3"), "{e}");
        let e = err(with(json!({"quant_method": "gptq", "bits": 4, "group_size": 256})), None);
        assert!(e.contains("group_size 256"), "{e}");
        let e = err(with(json!({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"})), None);
        assert!(e.contains("checkpoint_format \"marlin\""), "{e}");
        let e = err(with(json!({"quant_method": "compressed-tensors", "format": "pack-quantized",
                                "config_groups": {}})), None);
        assert!(e.contains("format \"pack-quantized\""), "{e}");
        let e = err(with(json!({"quant_method": "compressed-tensors", "config_groups": {"group_0":
            {"weights": {"num_bits": 8, "type": "float", "strategy": "block"}}}})), None);
        assert!(e.contains("config_groups.group_0.weights.strategy"), "{e}");
        let e = err(with(json!({"quant_method": "gptq", "bits": 4, "lm_head": true})), None);
        assert!(e.contains("lm_head true"), "{e}");
        let e = err(with(json!({"quant_method": "bitsandbytes"})), None);
        assert!(e.contains("bitsandbytes-nf4"), "{e}");
    }

    #[test]
    fn a_contradicting_flag_is_named() {
        let awq = with(json!({"quant_method": "awq", "bits": 4, "group_size": 128}));
        let e = err(awq.clone(), Some(QuantizeArg::Gptq));
        assert!(e.contains("`--quantize gptq` contradicts") && e.contains("\"awq\""), "{e}");
        let e = err(awq, Some(QuantizeArg::BitsandbytesNf4));
        assert!(e.contains("`--quantize bitsandbytes-nf4`"), "{e}");
        let e = err(json!({"model_type": "llama"}), Some(QuantizeArg::Awq));
        assert!(e.contains("`--quantize awq` needs a checkpoint quantized with AWQ"), "{e}");
        let e = err(json!({"model_type": "llama"}), Some(QuantizeArg::Marlin));
        assert!(e.contains("quantized with GPTQ or AWQ"), "{e}");
    }
}
