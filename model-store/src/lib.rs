//! A local model's files, in either of the two layouts we serve: a Hugging Face
//! directory (config.json, *.safetensors, tokenizer.json, tokenizer_config.json,
//! generation_config.json) or a single GGUF file carrying its own tokenizer and
//! chat template. Downloading from the Hub happens before this (in the launcher);
//! everything here reads local files only.

pub mod quantization;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::pre_tokenizers::{
    byte_level::ByteLevel, digits::Digits, sequence::Sequence, PreTokenizerWrapper,
};
use tokenizers::Tokenizer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// A directory with config.json and safetensors weights.
    HuggingFace,
    /// One `.gguf` file (llama.cpp format), weights possibly quantized.
    Gguf,
}

/// Token ids and texts the server needs to frame and stop generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token: Option<String>,
    /// Every id that ends generation (generation_config.json may list several).
    pub eos_token_ids: Vec<u32>,
}

/// The sampling values of generation_config.json, which vLLM (and transformers) take
/// for the request fields a client leaves unset; `None` where the model sets none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SamplingDefaults {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
}

pub struct ModelFiles {
    path: PathBuf,
    layout: Layout,
}

impl ModelFiles {
    /// `path` is an HF-layout directory, a `.gguf` file, or a directory holding exactly one `.gguf` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
                return Ok(Self { path: path.to_path_buf(), layout: Layout::Gguf });
            }
            bail!("{} is a file but not a .gguf file", path.display());
        }
        if !path.is_dir() {
            bail!("model path {} does not exist", path.display());
        }
        if path.join("config.json").is_file() {
            return Ok(Self { path: path.to_path_buf(), layout: Layout::HuggingFace });
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => Ok(Self { path: one.clone(), layout: Layout::Gguf }),
            [] => bail!("{} has neither config.json nor a .gguf file", path.display()),
            _ => bail!("{} holds several .gguf files: name one", path.display()),
        }
    }

    /// The directory (HF layout) or the `.gguf` file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Reads the GGUF header (metadata and tensor index, not the tensor data).
    pub fn gguf_content(&self) -> Result<gguf_file::Content> {
        if self.layout != Layout::Gguf {
            bail!("{} is not a GGUF model", self.path.display());
        }
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        gguf_file::Content::read(&mut file)
            .map_err(|e| anyhow::anyhow!("reading GGUF {}: {e}", self.path.display()))
    }

    /// The linear weights' format served with `--quantize` `flag`: the checkpoint's own
    /// (config.json's quantization_config, which the flag must agree with), or dense
    /// weights quantized at load; None for weights served as stored.
    pub fn quantization(
        &self,
        flag: Option<quantization::QuantizeArg>,
    ) -> Result<Option<quantization::Quantization>> {
        match (&self.layout, flag) {
            (Layout::HuggingFace, flag) => {
                let mut config = self.config_json()?;
                // Older AutoGPTQ and AutoAWQ checkpoints keep it in their tool's own file.
                if config.get("quantization_config").is_none_or(Value::is_null) {
                    for (file, method) in [("quantize_config.json", "gptq"), ("quant_config.json", "awq")] {
                        if let Some(mut own) = self.read_json(file)? {
                            if own.get("quant_method").is_none() {
                                own["quant_method"] = method.into();
                            }
                            config["quantization_config"] = own;
                            break;
                        }
                    }
                }
                quantization::resolve(&config, flag)
            }
            (Layout::Gguf, None) => Ok(None),
            (Layout::Gguf, Some(flag)) => bail!(
                "`--quantize {flag}` applies to safetensors checkpoints: a GGUF file is served in \
                 the formats its tensors are stored in; leave --quantize out"
            ),
        }
    }

    /// config.json as JSON (HF layout only).
    pub fn config_json(&self) -> Result<Value> {
        self.read_json("config.json")?
            .with_context(|| format!("{} has no config.json", self.path.display()))
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self.layout {
            Layout::HuggingFace => {
                let file = self.path.join("tokenizer.json");
                Tokenizer::from_file(&file)
                    .map_err(|e| anyhow::anyhow!("loading {}: {e}", file.display()))
            }
            Layout::Gguf => tokenizer_from_gguf(&self.gguf_content()?),
        }
    }

    /// The Jinja chat template: `chat_template.jinja`, tokenizer_config.json's
    /// `chat_template` (a string, or a list of named templates of which "default"
    /// is taken), or the GGUF's `tokenizer.chat_template`.
    pub fn chat_template(&self) -> Result<Option<String>> {
        match self.layout {
            Layout::HuggingFace => {
                let jinja = self.path.join("chat_template.jinja");
                if jinja.is_file() {
                    return Ok(Some(std::fs::read_to_string(jinja)?));
                }
                let Some(config) = self.read_json("tokenizer_config.json")? else {
                    return Ok(None);
                };
                Ok(match config.get("chat_template") {
                    Some(Value::String(t)) => Some(t.clone()),
                    Some(Value::Array(named)) => named
                        .iter()
                        .find(|t| t["name"] == "default")
                        .or(named.first())
                        .and_then(|t| t["template"].as_str())
                        .map(str::to_string),
                    _ => None,
                })
            }
            Layout::Gguf => Ok(gguf_string(&self.gguf_content()?, "tokenizer.chat_template")),
        }
    }

    pub fn special_tokens(&self) -> Result<SpecialTokens> {
        let tokenizer = self.tokenizer()?;
        let mut special = SpecialTokens::default();
        match self.layout {
            Layout::HuggingFace => {
                let tok_config = self.read_json("tokenizer_config.json")?.unwrap_or(Value::Null);
                special.bos_token = token_text(&tok_config["bos_token"]);
                special.eos_token = token_text(&tok_config["eos_token"]);
                let gen_config = self.read_json("generation_config.json")?.unwrap_or(Value::Null);
                let config = self.config_json()?;
                special.eos_token_ids = ids(&gen_config["eos_token_id"]);
                if special.eos_token_ids.is_empty() {
                    special.eos_token_ids = ids(&config["eos_token_id"]);
                }
                special.bos_token_id = ids(&gen_config["bos_token_id"])
                    .first()
                    .or(ids(&config["bos_token_id"]).first())
                    .copied();
            }
            Layout::Gguf => {
                let content = self.gguf_content()?;
                let id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
                special.bos_token_id = id("tokenizer.ggml.bos_token_id");
                special.eos_token_ids = id("tokenizer.ggml.eos_token_id").into_iter().collect();
            }
        }
        if let Some(eos) = &special.eos_token {
            if let Some(id) = tokenizer.token_to_id(eos) {
                if !special.eos_token_ids.contains(&id) {
                    special.eos_token_ids.push(id);
                }
            }
        }
        if special.eos_token.is_none() {
            special.eos_token = special.eos_token_ids.first().and_then(|&id| tokenizer.id_to_token(id));
        }
        if special.bos_token_id.is_none() {
            special.bos_token_id = special.bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        }
        if special.bos_token.is_none() {
            special.bos_token = special.bos_token_id.and_then(|id| tokenizer.id_to_token(id));
        }
        Ok(special)
    }

    /// generation_config.json's sampling values, whatever its `do_sample` says (as vLLM
    /// reads them); none for a GGUF file, which has no generation config. A value that
    /// is not a number counts as unset, and so does `top_k: 0` (transformers' "no top-k").
    pub fn sampling_defaults(&self) -> Result<SamplingDefaults> {
        let Some(config) = self.read_json("generation_config.json")? else {
            return Ok(SamplingDefaults::default());
        };
        let number = |key: &str| config[key].as_f64().map(|v| v as f32);
        Ok(SamplingDefaults {
            temperature: number("temperature"),
            top_p: number("top_p"),
            top_k: config["top_k"].as_i64().and_then(|k| i32::try_from(k).ok()).filter(|&k| k != 0),
            min_p: number("min_p"),
            repetition_penalty: number("repetition_penalty"),
        })
    }

    /// The longest sequence the model was trained for: config.json's
    /// `max_position_embeddings` (or its older names) or the GGUF's
    /// `{architecture}.context_length`. `None` when the model does not say.
    pub fn max_position_embeddings(&self) -> Result<Option<usize>> {
        match self.layout {
            Layout::HuggingFace => {
                let config = self.config_json()?;
                Ok(["max_position_embeddings", "max_seq_len", "n_positions"]
                    .iter()
                    .find_map(|key| config[key].as_u64())
                    .map(|n| n as usize))
            }
            Layout::Gguf => {
                let content = self.gguf_content()?;
                Ok(gguf_string(&content, "general.architecture")
                    .and_then(|arch| content.metadata.get(&format!("{arch}.context_length")))
                    .and_then(|v| v.to_u64().ok())
                    .map(|n| n as usize))
            }
        }
    }

    fn read_json(&self, name: &str) -> Result<Option<Value>> {
        let file = self.path.join(name);
        if self.layout != Layout::HuggingFace || !file.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?))
    }
}

/// candle's GGUF tokenizer conversion, plus the pre-tokenizers it does not know:
/// SmolLM's ("smollm") splits every digit on its own before byte-level BPE.
pub fn tokenizer_from_gguf(content: &gguf_file::Content) -> Result<Tokenizer> {
    let mut tokenizer =
        Tokenizer::from_gguf(content).map_err(|e| anyhow::anyhow!("GGUF tokenizer: {e}"))?;
    if gguf_string(content, "tokenizer.ggml.pre").as_deref() == Some("smollm") {
        let digits: PreTokenizerWrapper = Digits::new(true).into();
        let byte_level: PreTokenizerWrapper = ByteLevel::new(false, true, true).into();
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![digits, byte_level])));
    }
    Ok(tokenizer)
}

fn gguf_string(content: &gguf_file::Content, key: &str) -> Option<String> {
    content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned()
}

/// `"<s>"` or `{"content": "<s>", ...}` as tokenizer_config.json writes special tokens.
fn token_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// An id or a list of ids.
fn ids(value: &Value) -> Vec<u32> {
    match value {
        Value::Number(n) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Value::Array(a) => a.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hf_special_tokens_and_template_list() {
        let dir = tempfile_dir();
        std::fs::write(dir.join("config.json"), r#"{"eos_token_id": 2, "bos_token_id": 1}"#).unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"eos_token_id": [2, 3]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": {"content": "</s>"}, "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        let tokenizer = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"<unk>":0,"<s>":1,"</s>":2,"hi":3},"unk_token":"<unk>"}}"#;
        std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
        let files = ModelFiles::open(&dir).unwrap();
        assert_eq!(files.layout(), &Layout::HuggingFace);
        assert_eq!(files.chat_template().unwrap().as_deref(), Some("D"));
        let special = files.special_tokens().unwrap();
        assert_eq!(special.eos_token_ids, vec![2, 3]);
        assert_eq!(special.bos_token_id, Some(1));
        assert_eq!(special.bos_token.as_deref(), Some("<s>"));
        assert_eq!(special.eos_token.as_deref(), Some("</s>"));
    }

    #[test]
    fn reads_sampling_defaults_from_generation_config() {
        let dir = tempfile_dir();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let files = ModelFiles::open(&dir).unwrap();
        assert_eq!(files.sampling_defaults().unwrap(), SamplingDefaults::default());
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05,
                "min_p": null, "eos_token_id": 2}"#,
        )
        .unwrap();
        let defaults = files.sampling_defaults().unwrap();
        let expected = SamplingDefaults {
            temperature: Some(0.6),
            top_p: Some(0.9),
            top_k: Some(20),
            min_p: None,
            repetition_penalty: Some(1.05),
        };
        assert_eq!(defaults, expected);
        assert_eq!(
            serde_json::to_value(defaults).unwrap(),
            serde_json::json!({"temperature": 0.6f32, "top_p": 0.9f32, "top_k": 20, "repetition_penalty": 1.05f32})
        );
        std::fs::write(dir.join("generation_config.json"), r#"{"top_k": 0, "temperature": "hot"}"#).unwrap();
        assert_eq!(files.sampling_defaults().unwrap(), SamplingDefaults::default());
    }

    #[test]
    fn reads_max_position_embeddings_from_config() {
        let dir = tempfile_dir();
        std::fs::write(dir.join("config.json"), r#"{"max_position_embeddings": 8192}"#).unwrap();
        let files = ModelFiles::open(&dir).unwrap();
        assert_eq!(files.max_position_embeddings().unwrap(), Some(8192));
        std::fs::write(dir.join("config.json"), r#"{"hidden_size": 64}"#).unwrap();
        assert_eq!(files.max_position_embeddings().unwrap(), None);
    }

    #[test]
    fn rejects_missing_and_non_model_paths() {
        assert!(ModelFiles::open("/definitely/not/here").is_err());
        let dir = tempfile_dir();
        assert!(ModelFiles::open(&dir).is_err());
        std::fs::write(dir.join("x.bin"), b"").unwrap();
        assert!(ModelFiles::open(dir.join("x.bin")).is_err());
    }

    /// config.json's quantization_config first, else AutoGPTQ's quantize_config.json or
    /// AutoAWQ's quant_config.json, whose method is implied; --quantize is checked against it.
    #[test]
    fn quantization_comes_from_config_json_or_the_tools_own_file() {
        use quantization::{QuantizeArg, Quantization};
        let dir = tempfile_dir();
        std::fs::write(dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
        let files = ModelFiles::open(&dir).unwrap();
        assert_eq!(files.quantization(None).unwrap(), None);
        std::fs::write(dir.join("quant_config.json"), r#"{"w_bit": 4, "q_group_size": 64, "version": "GEMM"}"#).unwrap();
        assert_eq!(files.quantization(None).unwrap(), Some(Quantization::Awq { group_size: 64 }));
        std::fs::write(dir.join("quantize_config.json"), r#"{"bits": 8, "group_size": 32}"#).unwrap();
        assert!(matches!(files.quantization(None).unwrap(), Some(Quantization::Gptq(g)) if g.bits == 8));
        let err = files.quantization(Some(QuantizeArg::Awq)).unwrap_err().to_string();
        assert!(err.contains("`--quantize awq` contradicts"), "{err}");
        std::fs::write(
            dir.join("config.json"),
            r#"{"model_type": "llama", "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}"#,
        )
        .unwrap();
        assert_eq!(files.quantization(None).unwrap(), Some(Quantization::Awq { group_size: 128 }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "model-store-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
