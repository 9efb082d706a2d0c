//! Turns `--model-id` into a local path the shards and the router can open: an existing
//! path as is, a Hub repository downloaded into (or, offline, found in) the standard
//! Hugging Face cache.

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Where `--model-id` points.
#[derive(Debug, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    /// A Hub repository; `gguf_file` names the one GGUF file to fetch instead of the
    /// safetensors weights.
    Hub { repo_id: String, gguf_file: Option<String> },
}

/// Files of a Hugging Face-layout repository the server reads (weights come on top).
const METADATA_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

impl ModelSource {
    pub fn parse(model_id: &str) -> Result<Self> {
        let path = Path::new(model_id);
        if path.exists() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let looks_like_path = path.is_absolute() || model_id.starts_with('.') || model_id.starts_with('~');
        if looks_like_path {
            bail!("`--model-id`: model path {model_id} does not exist");
        }
        let parts: Vec<&str> = model_id.split('/').collect();
        let valid_name = |part: &str| {
            !part.is_empty()
                && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        match parts.as_slice() {
            [_] | [_, _] if parts.iter().all(|p| valid_name(p)) => {
                Ok(Self::Hub { repo_id: model_id.to_string(), gguf_file: None })
            }
            [org, name, file] if valid_name(org) && valid_name(name) && file.ends_with(".gguf") => {
                Ok(Self::Hub { repo_id: format!("{org}/{name}"), gguf_file: Some(file.to_string()) })
            }
            _ => bail!(
                "`--model-id` {model_id} is neither an existing path nor a Hub id \
                 (`org/name` or `org/name/file.gguf`)"
            ),
        }
    }
}

/// Hub client settings from the environment, as huggingface_hub reads them.
struct HubSettings {
    cache_dir: PathBuf,
    token: Option<String>,
    offline: bool,
}

impl HubSettings {
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| Cache::from_env().path().clone());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        // Without HF_TOKEN, the token file `huggingface-cli login` wrote (read by the builder).
        Self { cache_dir, token: var("HF_TOKEN"), offline }
    }
}

/// The local path to serve `model_id` from, downloading it first if it is a Hub id.
/// Blocking (network and disk).
pub fn resolve(model_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let (repo_id, gguf_file) = match ModelSource::parse(model_id)? {
        ModelSource::Local(path) => return Ok(path),
        ModelSource::Hub { repo_id, gguf_file } => (repo_id, gguf_file),
    };
    let settings = HubSettings::from_env();
    let repo = Repo::with_revision(repo_id.clone(), RepoType::Model, revision.unwrap_or("main").to_string());
    let fetched = if settings.offline {
        from_cache(&settings, repo, gguf_file.as_deref())
    } else {
        download(&settings, repo, gguf_file.as_deref())
    };
    fetched.with_context(|| format!("`--model-id` {model_id} is not a local path and fetching it from the Hub failed"))
}

fn download(settings: &HubSettings, repo: Repo, gguf_file: Option<&str>) -> Result<PathBuf> {
    let mut builder = ApiBuilder::from_env().with_cache_dir(settings.cache_dir.clone()).with_progress(false);
    if settings.token.is_some() {
        builder = builder.with_token(settings.token.clone());
    }
    let api = builder.build()?.repo(repo);
    let fetch = |file: &str| -> Result<PathBuf> {
        tracing::info!("Downloading {file}");
        api.get(file).with_context(|| format!("downloading {file}"))
    };
    if let Some(file) = gguf_file {
        return fetch(file);
    }
    let listing: Vec<String> = api.info().context("listing the repository")?.siblings.into_iter().map(|s| s.rfilename).collect();
    let files = files_to_fetch(&listing)?;
    let mut config = None;
    for file in &files {
        let local = fetch(file)?;
        if file == "config.json" {
            config = Some(local);
        }
    }
    snapshot_dir(config)
}

fn from_cache(settings: &HubSettings, repo: Repo, gguf_file: Option<&str>) -> Result<PathBuf> {
    let cache = Cache::new(settings.cache_dir.clone()).repo(repo);
    let cached = |file: &str| {
        cache.get(file).with_context(|| {
            format!("HF_HUB_OFFLINE is set and {file} is not in the cache {}", settings.cache_dir.display())
        })
    };
    match gguf_file {
        Some(file) => cached(file),
        None => snapshot_dir(Some(cached("config.json")?)),
    }
}

/// The snapshot directory holding the downloaded config.json (and the other files).
fn snapshot_dir(config: Option<PathBuf>) -> Result<PathBuf> {
    let config = config.context("the repository has no config.json")?;
    Ok(config.parent().context("config.json has no parent directory")?.to_path_buf())
}

/// Metadata and safetensors weights at the top of the repository (not subfolders
/// like `onnx/` or `original/`). Fails when there are no safetensors weights.
fn files_to_fetch(listing: &[String]) -> Result<Vec<String>> {
    let top_level = listing.iter().filter(|f| !f.contains('/'));
    let weights: Vec<String> = top_level
        .clone()
        .filter(|f| f.ends_with(".safetensors") || *f == "model.safetensors.index.json")
        .cloned()
        .collect();
    if !weights.iter().any(|f| f.ends_with(".safetensors")) {
        bail!(
            "the repository has no safetensors weights; for a GGUF repository name the file, \
             as `org/name/file.gguf`"
        );
    }
    let metadata = top_level.filter(|f| METADATA_FILES.contains(&f.as_str())).cloned();
    Ok(metadata.chain(weights).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_local_paths_and_hub_ids() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().to_str().unwrap();
        assert_eq!(ModelSource::parse(local).unwrap(), ModelSource::Local(dir.path().to_path_buf()));
        assert_eq!(
            ModelSource::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap(),
            ModelSource::Hub { repo_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), gguf_file: None }
        );
        assert_eq!(
            ModelSource::parse("org/repo/model.Q4_1.gguf").unwrap(),
            ModelSource::Hub { repo_id: "org/repo".into(), gguf_file: Some("model.Q4_1.gguf".into()) }
        );
        assert_eq!(ModelSource::parse("gpt2").unwrap(), ModelSource::Hub { repo_id: "gpt2".into(), gguf_file: None });
    }

    #[test]
    fn missing_paths_and_bad_ids_are_clear_errors() {
        let missing = ModelSource::parse("/no/such/model").unwrap_err().to_string();
        assert!(missing.contains("model path /no/such/model does not exist"), "{missing}");
        assert!(ModelSource::parse("./no-such-model.gguf").is_err());
        assert!(ModelSource::parse("a/b/c/d").is_err());
        assert!(ModelSource::parse("org/repo name").is_err());
    }

    #[test]
    fn fetches_metadata_and_top_level_safetensors() {
        let listing: Vec<String> = [
            "config.json",
            "README.md",
            "tokenizer.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "onnx/model.onnx",
            "original/consolidated.safetensors",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            files_to_fetch(&listing).unwrap(),
            vec![
                "config.json",
                "tokenizer.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
            ]
        );
        let gguf_only = ["config.json".to_string(), "model.Q4_0.gguf".to_string()];
        assert!(files_to_fetch(&gguf_only).unwrap_err().to_string().contains("org/name/file.gguf"));
    }

    #[test]
    fn offline_mode_reads_the_cache_only() {
        let cache = tempfile::tempdir().unwrap();
        let settings = HubSettings { cache_dir: cache.path().to_path_buf(), token: None, offline: true };
        let repo = || Repo::with_revision("org/model".into(), RepoType::Model, "main".into());
        let err = from_cache(&settings, repo(), None).unwrap_err().to_string();
        assert!(err.contains("HF_HUB_OFFLINE is set and config.json is not in the cache"), "{err}");

        // The layout huggingface_hub writes: refs/<revision> names the snapshot.
        let repo_dir = cache.path().join("models--org--model");
        let snapshot = repo_dir.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs").join("main"), "abc123").unwrap();
        std::fs::write(snapshot.join("config.json"), "{}").unwrap();
        assert_eq!(from_cache(&settings, repo(), None).unwrap(), snapshot);
    }
}
