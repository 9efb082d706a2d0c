//! The `grammar` of a request, checked before it is queued: compiled once against the
//! model's tokenizer (within a time limit), so that a grammar the shard could not
//! follow is a 422 naming the problem, never a failed or stuck batch.

use super::ValidationError;
use crate::api::generate::GrammarParameter;
use grammar::{GrammarCompiler, GrammarSpec};
use std::time::Duration;

/// The longest a grammar may take to compile (llguidance's fuel limits bound the work;
/// this bounds the wait).
pub const GRAMMAR_CHECK_LIMIT: Duration = Duration::from_secs(5);

/// Whether this server takes grammars.
#[derive(Clone)]
pub enum GrammarSupport {
    Enabled(GrammarCompiler),
    /// `--disable-grammar-support`.
    Disabled,
    /// The model's tokenizer cannot be read token by token as bytes.
    Unavailable(String),
}

impl GrammarSupport {
    /// Enabled unless `disabled`, or unavailable with the reason the compiler gave.
    pub fn new(tokenizer: &tokenizers::Tokenizer, eos_token_ids: &[u32], disabled: bool) -> Self {
        if disabled {
            return GrammarSupport::Disabled;
        }
        match GrammarCompiler::new(tokenizer, eos_token_ids) {
            Ok(compiler) => GrammarSupport::Enabled(compiler),
            Err(error) => GrammarSupport::Unavailable(format!("{error:#}")),
        }
    }

    /// The grammar `parameter` asks for, compiled once to check it.
    pub async fn check(&self, parameter: &GrammarParameter) -> Result<GrammarSpec, ValidationError> {
        let compiler = match self {
            GrammarSupport::Enabled(compiler) => compiler.clone(),
            GrammarSupport::Disabled => return Err(ValidationError::GrammarDisabled),
            GrammarSupport::Unavailable(reason) => return Err(ValidationError::GrammarUnavailable(reason.clone())),
        };
        let spec = spec(parameter)?;
        let checked = spec.clone();
        tokio::task::spawn_blocking(move || compiler.check(&checked, GRAMMAR_CHECK_LIMIT))
            .await
            .map_err(|e| ValidationError::Grammar(format!("the grammar check failed: {e}")))?
            .map_err(|e| ValidationError::Grammar(format!("{e:#}")))?;
        Ok(spec)
    }
}

/// The parameter as a grammar; a JSON schema may come as a string holding one.
fn spec(parameter: &GrammarParameter) -> Result<GrammarSpec, ValidationError> {
    Ok(match parameter {
        GrammarParameter::Json(serde_json::Value::String(text)) => GrammarSpec::JsonSchema(
            serde_json::from_str(text)
                .map_err(|e| ValidationError::Grammar(format!("the JSON schema string does not parse: {e}")))?,
        ),
        GrammarParameter::Json(schema) => GrammarSpec::JsonSchema(schema.clone()),
        GrammarParameter::Regex(regex) => GrammarSpec::Regex(regex.clone()),
        GrammarParameter::Lark(lark) => GrammarSpec::Lark(lark.clone()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// The default model's grammar support (its byte-level tokenizer).
    pub(crate) fn smollm2_support() -> GrammarSupport {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct");
        let files = model_store::ModelFiles::open(path).expect("the default model (scripts/fetch-default-model.sh)");
        let eos = files.special_tokens().unwrap().eos_token_ids;
        GrammarSupport::new(&files.tokenizer().unwrap(), &eos, false)
    }

    #[tokio::test]
    async fn grammars_compile_or_say_why_not() {
        let support = smollm2_support();
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            support.check(&GrammarParameter::Json(schema.clone())).await.unwrap(),
            GrammarSpec::JsonSchema(schema.clone())
        );
        let as_string = GrammarParameter::Json(json!(schema.to_string()));
        assert_eq!(support.check(&as_string).await.unwrap(), GrammarSpec::JsonSchema(schema));
        assert!(support.check(&GrammarParameter::Regex("[0-9]+".into())).await.is_ok());
        for bad in [
            GrammarParameter::Regex("([0-9]".into()),
            GrammarParameter::Json(json!({"type": "object", "properties": {"a": {"type": "wat"}}})),
            GrammarParameter::Json(json!("{not json")),
            GrammarParameter::Lark("start: missing".into()),
        ] {
            assert!(matches!(support.check(&bad).await, Err(ValidationError::Grammar(_))), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn disabled_or_unavailable_support_refuses_grammars() {
        let regex = GrammarParameter::Regex("a".into());
        assert_eq!(GrammarSupport::Disabled.check(&regex).await, Err(ValidationError::GrammarDisabled));
        // A word-level tokenizer has no byte-level decoder to read tokens with.
        let words = GrammarSupport::new(&super::super::tokenizer::tests::word_tokenizer(), &[2], false);
        assert!(matches!(words.check(&regex).await, Err(ValidationError::GrammarUnavailable(_))));
    }
}
