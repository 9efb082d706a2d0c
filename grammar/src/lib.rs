//! Grammars that constrain generation (structured output), compiled by `llguidance`
//! against the model's tokenizer: JSON Schema, regular expressions and Lark grammars.
//!
//! The router compiles a request's grammar once to validate it ([`GrammarCompiler::check`],
//! bounded in time); the shard compiles it again for the request and, step by step, asks
//! its [`Constraint`] which tokens may come next ([`TokenMask`]) and tells it which came.

use anyhow::{anyhow, bail, ensure, Context, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON Schema (`{}` accepts any JSON value).
    JsonSchema(serde_json::Value),
    /// A regular expression the whole output matches.
    Regex(String),
    /// A Lark grammar in llguidance's dialect (which embeds `%json { schema }`).
    Lark(String),
}

/// JSON is written on one line, with `", "` and `": "` between items (as Python's
/// `json.dumps`): llguidance's default lets white space run free, and sampled
/// requests then fill their token budget with it. A schema's own `x-guidance` wins.
pub fn with_json_layout(schema: serde_json::Value) -> serde_json::Value {
    match schema {
        serde_json::Value::Object(mut object) => {
            object.entry("x-guidance").or_insert_with(|| {
                serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
            });
            serde_json::Value::Object(object)
        }
        other => other,
    }
}

impl GrammarSpec {
    fn to_llguidance(&self) -> TopLevelGrammar {
        match self {
            GrammarSpec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_json_layout(schema.clone())),
            GrammarSpec::Regex(regex) => TopLevelGrammar::from_regex(regex),
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// The model's tokenizer as llguidance sees it: the bytes of every token in a trie,
/// and the tokenizer itself for the grammar's literal strings.
struct ModelTokenizer {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for ModelTokenizer {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.tokenizer
                .encode_fast(s, false)
                .map(|encoding| encoding.get_ids().to_vec())
                // The trie's greedy split is a valid (if not canonical) tokenization.
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s.as_bytes()))
        })
    }
}

/// Compiles grammars against one tokenizer; cheap to clone and share between threads.
#[derive(Clone)]
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
}

impl GrammarCompiler {
    /// `eos_token_ids`: the tokens that end generation; a complete grammar allows them
    /// (and only them).
    pub fn new(tokenizer: &tokenizers::Tokenizer, eos_token_ids: &[u32]) -> Result<Self> {
        let json = tokenizer
            .to_string(false)
            .map_err(|e| anyhow!("serializing the tokenizer: {e}"))?;
        let json: serde_json::Value = serde_json::from_str(&json)?;
        let mut token_bytes = llguidance::token_bytes_from_tokenizer_json(&json)
            .context("reading the tokens' bytes from the tokenizer")?;
        let vocab = token_bytes.len().max(tokenizer.get_vocab_size(true));
        token_bytes.resize(vocab, Vec::new());
        let (&first_eos, _) = eos_token_ids
            .split_first()
            .context("a grammar needs the model's end-of-sequence token")?;
        ensure!(
            eos_token_ids.iter().all(|&id| (id as usize) < vocab),
            "end-of-sequence tokens {eos_token_ids:?} outside the vocabulary of {vocab}"
        );
        let trie = TokTrie::from(&TokRxInfo::new(vocab as u32, first_eos), &token_bytes)
            .with_eos_tokens(eos_token_ids);
        let env = Arc::new(ModelTokenizer {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new_simple(&(env as llguidance::toktrie::TokEnv))?;
        // Errors go back to the request, not to stderr.
        factory.quiet();
        factory.limits_mut().verbose_errors = false;
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// Tokens the masks cover: ids at or above it are never allowed.
    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }

    /// The grammar's state at the start of generation. Compiling is bounded by
    /// llguidance's fuel limits (lexer size, grammar size, items per step), so a
    /// pathological schema fails rather than running away; [`Self::check`] adds a
    /// wall-clock bound.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint> {
        let parser = self.factory.create_parser(spec.to_llguidance())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            bail!("{error}");
        }
        Ok(Constraint { matcher })
    }

    /// Compiles `spec` and computes its first mask within `limit` (on a thread of its
    /// own, so that a slow schema cannot hold the caller): what validation runs.
    pub fn check(&self, spec: &GrammarSpec, limit: Duration) -> Result<()> {
        let (sender, receiver) = mpsc::channel();
        let compiler = self.clone();
        let spec = spec.clone();
        std::thread::Builder::new()
            .name("grammar-check".to_string())
            .spawn(move || {
                let checked = compiler
                    .compile(&spec)
                    .and_then(|mut constraint| constraint.allowed_tokens().map(drop));
                // The caller may have stopped waiting.
                let _ = sender.send(checked);
            })?;
        match receiver.recv_timeout(limit) {
            Ok(checked) => checked,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("the grammar did not compile within {} ms", limit.as_millis())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("compiling the grammar failed"),
        }
    }
}

/// One request's position in its grammar.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// The tokens the grammar allows next (only end-of-sequence once it is complete).
    /// Takes up to a few milliseconds: callers run it next to the forward pass.
    pub fn allowed_tokens(&mut self) -> Result<TokenMask> {
        Ok(TokenMask(self.matcher.compute_mask_or_eos()?))
    }

    /// Advances past the chosen token; an error when the grammar forbids it.
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token)
    }

    /// The grammar allows nothing more (it consumed an end-of-sequence token, or its
    /// language has no longer strings).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// A set of token ids, one bit each: bit `i % 32` of word `i / 32` is token `i`.
#[derive(Debug, Clone)]
pub struct TokenMask(SimpleVob);

impl TokenMask {
    /// A mask over `vocab` tokens allowing `tokens`.
    pub fn of(vocab: usize, tokens: impl IntoIterator<Item = u32>) -> Self {
        let mut set = SimpleVob::alloc(vocab);
        for token in tokens {
            set.allow_token(token);
        }
        Self(set)
    }

    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// The bit words, covering [`GrammarCompiler::vocab_size`] tokens.
    pub fn words(&self) -> &[u32] {
        self.0.as_slice()
    }

    /// Tokens the mask covers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The default model's tokenizer (byte-level BPE, 49,152 tokens) and its compiler,
    /// built once for all tests.
    fn smollm2() -> (tokenizers::Tokenizer, GrammarCompiler) {
        static SMOLLM2: std::sync::OnceLock<(tokenizers::Tokenizer, GrammarCompiler)> = std::sync::OnceLock::new();
        SMOLLM2
            .get_or_init(|| {
                let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct");
                let files = model_store::ModelFiles::open(path)
                    .expect("the default model (scripts/fetch-default-model.sh)");
                let tokenizer = files.tokenizer().unwrap();
                let eos = files.special_tokens().unwrap().eos_token_ids;
                let compiler = GrammarCompiler::new(&tokenizer, &eos).unwrap();
                (tokenizer, compiler)
            })
            .clone()
    }

    fn ids(tokenizer: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
        tokenizer.encode(text, false).unwrap().get_ids().to_vec()
    }

    /// Feeds `text`'s tokens, checking that each was allowed.
    fn feed(constraint: &mut Constraint, tokenizer: &tokenizers::Tokenizer, text: &str) {
        for token in ids(tokenizer, text) {
            let mask = constraint.allowed_tokens().unwrap();
            assert!(mask.allows(token), "token {token} of {text:?} forbidden");
            constraint.accept(token).unwrap();
        }
    }

    #[test]
    fn a_regex_allows_its_strings_then_only_the_end() {
        let (tokenizer, compiler) = smollm2();
        let eos = compiler.factory.tok_env().tok_trie().eos_token();
        let mut constraint = compiler.compile(&GrammarSpec::Regex("[0-9]{3}-ok".into())).unwrap();
        let first = constraint.allowed_tokens().unwrap();
        assert_eq!(first.len(), compiler.vocab_size());
        assert!(!first.allows(ids(&tokenizer, "a")[0]));
        assert!(!first.allows(eos));
        feed(&mut constraint, &tokenizer, "123-ok");
        // Nothing can follow: the grammar is finished, and only the end is allowed.
        assert!(constraint.is_finished());
        let last = constraint.allowed_tokens().unwrap();
        assert!(last.allows(eos));
        assert_eq!((0..last.len() as u32).filter(|&t| last.allows(t)).count(), 1);
        // A grammar that may go on or end allows both, and ends with the end token.
        let mut digits = compiler.compile(&GrammarSpec::Regex("[0-9]+".into())).unwrap();
        feed(&mut digits, &tokenizer, "12");
        let mask = digits.allowed_tokens().unwrap();
        assert!(mask.allows(eos) && mask.allows(ids(&tokenizer, "3")[0]));
        assert!(!digits.is_finished());
        digits.accept(eos).unwrap();
        assert!(digits.is_finished());
    }

    #[test]
    fn a_json_schema_constrains_keys_and_types() {
        let (tokenizer, compiler) = smollm2();
        let schema = json!({
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": false
        });
        let mut constraint = compiler.compile(&GrammarSpec::JsonSchema(schema)).unwrap();
        let first = constraint.allowed_tokens().unwrap();
        assert!(!first.allows(ids(&tokenizer, "Hello")[0]));
        feed(&mut constraint, &tokenizer, r#"{"name": "Ann", "age":"#);
        // One space after the colon, no more: white space cannot run on.
        let mask = constraint.allowed_tokens().unwrap();
        assert!(!mask.allows(ids(&tokenizer, "\n")[0]) && !mask.allows(ids(&tokenizer, "4")[0]));
        feed(&mut constraint, &tokenizer, " ");
        // A string where the integer goes is forbidden.
        let mask = constraint.allowed_tokens().unwrap();
        assert!(!mask.allows(ids(&tokenizer, "\"")[0]));
        assert!(mask.allows(ids(&tokenizer, "4")[0]));
        feed(&mut constraint, &tokenizer, "42}");
        let eos = compiler.factory.tok_env().tok_trie().eos_token();
        assert!(constraint.allowed_tokens().unwrap().allows(eos));
        // A token the grammar forbids is an error, not a silent advance.
        assert!(constraint.clone().accept(ids(&tokenizer, "x")[0]).is_err());
    }

    #[test]
    fn lark_grammars_compile() {
        let (tokenizer, compiler) = smollm2();
        let mut constraint = compiler
            .compile(&GrammarSpec::Lark(r#"start: "yes" | "no""#.into()))
            .unwrap();
        feed(&mut constraint, &tokenizer, "no");
    }

    #[test]
    fn bad_grammars_are_errors_naming_the_problem() {
        let (_, compiler) = smollm2();
        let limit = Duration::from_secs(10);
        let bad_regex = compiler.check(&GrammarSpec::Regex("(unclosed".into()), limit);
        assert!(bad_regex.is_err());
        let bad_schema = compiler.check(&GrammarSpec::JsonSchema(json!({"type": "no-such-type"})), limit);
        assert!(bad_schema.unwrap_err().to_string().contains("no-such-type"));
        let bad_lark = compiler.check(&GrammarSpec::Lark("start: undefined_rule".into()), limit);
        assert!(bad_lark.is_err());
        compiler.check(&GrammarSpec::JsonSchema(json!({})), limit).unwrap();
    }

    #[test]
    fn a_check_that_runs_past_its_limit_fails() {
        let (_, compiler) = smollm2();
        // Long alternations of distinct keys take a while to build a lexer for.
        let properties: serde_json::Map<String, serde_json::Value> = (0..2_000)
            .map(|i| (format!("field_{i}"), json!({"type": "string", "pattern": format!("^[a-z]{{{i}}}x$")})))
            .collect();
        let schema = json!({"type": "object", "properties": properties, "required": ["field_1999"]});
        let error = compiler
            .check(&GrammarSpec::JsonSchema(schema), Duration::from_millis(1))
            .unwrap_err();
        assert!(error.to_string().contains("did not compile within 1 ms"), "{error}");
    }
}
