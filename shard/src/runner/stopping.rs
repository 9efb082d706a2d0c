//! When a request stops, and the text of its tokens as they come.
//!
//! Detokenization is incremental, as TGI's `decode_token`: a token's text is the
//! difference between decoding a short window ending with it and the same window
//! without it, and is held back while it ends in an incomplete UTF-8 sequence, so
//! characters split over several byte-level tokens come out whole.

use anyhow::{anyhow, Result};
use proto::v3::{FinishReason, StoppingCriteriaParameters};
use tokenizers::Tokenizer;

/// Tokens before the read offset that are re-decoded with a new token, so that
/// tokenizer decoders that look at neighbours (spaces, byte fallback) see context.
const DECODE_CONTEXT_TOKENS: usize = 5;

pub struct StoppingCriteria {
    max_new_tokens: u32,
    stop_sequences: Vec<String>,
    ignore_eos_token: bool,
    generated_tokens: u32,
    /// The tail of the generated text, long enough to hold any stop sequence.
    text_tail: String,
}

impl StoppingCriteria {
    pub fn new(params: Option<&StoppingCriteriaParameters>) -> Self {
        let params = params.cloned().unwrap_or_default();
        Self {
            max_new_tokens: params.max_new_tokens,
            stop_sequences: params
                .stop_sequences
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            ignore_eos_token: params.ignore_eos_token,
            generated_tokens: 0,
            text_tail: String::new(),
        }
    }

    pub fn generated_tokens(&self) -> u32 {
        self.generated_tokens
    }

    pub fn max_new_tokens(&self) -> u32 {
        self.max_new_tokens
    }

    /// Whether the next generated token stops generation by itself, before its text is
    /// known: by length, then EOS (TGI's order).
    pub fn stops_on_token(&self, token: u32, eos_token_ids: &[u32]) -> Option<FinishReason> {
        if self.generated_tokens + 1 >= self.max_new_tokens {
            Some(FinishReason::Length)
        } else if !self.ignore_eos_token && eos_token_ids.contains(&token) {
            Some(FinishReason::EosToken)
        } else {
            None
        }
    }

    /// Accounts for one generated token and its text; returns why generation stops, if it does.
    /// Checked in TGI's order: length, then EOS, then stop sequences.
    pub fn check(&mut self, token: u32, text: &str, eos_token_ids: &[u32]) -> Option<FinishReason> {
        let on_token = self.stops_on_token(token, eos_token_ids);
        self.generated_tokens += 1;
        if on_token.is_some() {
            return on_token;
        }
        if self.stop_sequences.is_empty() || text.is_empty() {
            return None;
        }
        let longest = self
            .stop_sequences
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        // Only a match that uses some of the new text is new.
        let search_from = floor_char_boundary(
            &self.text_tail,
            self.text_tail.len().saturating_sub(longest - 1),
        );
        self.text_tail.push_str(text);
        let window = &self.text_tail[search_from..];
        let stopped = self
            .stop_sequences
            .iter()
            .any(|s| window.contains(s.as_str()));
        let keep_from = floor_char_boundary(
            &self.text_tail,
            self.text_tail.len().saturating_sub(longest),
        );
        self.text_tail.drain(..keep_from);
        stopped.then_some(FinishReason::StopSequence)
    }
}

fn floor_char_boundary(s: &str, mut index: usize) -> usize {
    while !s.is_char_boundary(index) {
        index -= 1;
    }
    index
}

/// Decodes `ids[prefix_offset..]` and returns the part after `ids[prefix_offset..read_offset]`,
/// or `None` while that part is empty or ends in an incomplete character.
fn decode_after(
    tokenizer: &Tokenizer,
    ids: &[u32],
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
) -> Result<Option<String>> {
    let decode = |ids: &[u32]| {
        tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("detokenizing: {e}"))
    };
    let prefix_text = decode(&ids[prefix_offset..read_offset])?;
    let new_text = decode(&ids[prefix_offset..])?;
    let complete = new_text.len() > prefix_text.len()
        && !new_text.ends_with(char::REPLACEMENT_CHARACTER)
        && new_text.is_char_boundary(prefix_text.len());
    Ok(complete.then(|| new_text[prefix_text.len()..].to_string()))
}

/// Per-sequence state of TGI's incremental `decode_token`.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// For a sequence whose first `start` tokens are context (the prompt) and not emitted.
    pub fn new(start: usize) -> Self {
        Self {
            prefix_offset: start.saturating_sub(DECODE_CONTEXT_TOKENS),
            read_offset: start,
        }
    }

    /// The text the last token of `ids` adds (empty while a character is incomplete).
    pub fn next(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
        match decode_after(tokenizer, ids, self.prefix_offset, self.read_offset, false)? {
            Some(text) => {
                self.prefix_offset = self.read_offset;
                self.read_offset = ids.len();
                Ok(text)
            }
            None => Ok(String::new()),
        }
    }
}

/// The text of `ids[start..]` without special tokens, decoded after one token of
/// context so that a leading space survives decoders that strip it.
pub fn decode_generated(tokenizer: &Tokenizer, ids: &[u32], start: usize) -> Result<String> {
    match decode_after(tokenizer, ids, start.saturating_sub(1), start, true)? {
        Some(text) => Ok(text),
        // Nothing complete after the context (e.g. only special tokens): decode alone.
        None => tokenizer
            .decode(&ids[start..], true)
            .map_err(|e| anyhow!("detokenizing: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level BPE tokenizer (GPT-2 style) where "é" (0xC3 0xA9) is two tokens.
    fn tokenizer() -> Tokenizer {
        let json = r#"{
          "version": "1.0", "truncation": null, "padding": null,
          "added_tokens": [{"id": 6, "content": "<eos>", "single_word": false, "lstrip": false,
                            "rstrip": false, "normalized": false, "special": true}],
          "normalizer": null,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
          "post_processor": null,
          "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
          "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                    "vocab": {"Ġ": 0, "a": 1, "b": 2, "Ã": 3, "©": 4, ".": 5}, "merges": []}
        }"#;
        Tokenizer::from_bytes(json).unwrap()
    }

    fn criteria(max_new_tokens: u32, stop: &[&str], ignore_eos_token: bool) -> StoppingCriteria {
        StoppingCriteria::new(Some(&StoppingCriteriaParameters {
            max_new_tokens,
            stop_sequences: stop.iter().map(|s| s.to_string()).collect(),
            ignore_eos_token,
        }))
    }

    #[test]
    fn stops_at_max_new_tokens() {
        let mut c = criteria(2, &[], false);
        assert_eq!(c.stops_on_token(1, &[6]), None);
        assert_eq!(c.check(1, "a", &[6]), None);
        // Known before the text, and asking does not count the token.
        assert_eq!(c.stops_on_token(1, &[6]), Some(FinishReason::Length));
        assert_eq!(c.stops_on_token(1, &[6]), Some(FinishReason::Length));
        assert_eq!(c.check(1, "a", &[6]), Some(FinishReason::Length));
    }

    #[test]
    fn stops_at_eos_unless_ignored() {
        assert_eq!(
            criteria(10, &[], false).check(6, "", &[6]),
            Some(FinishReason::EosToken)
        );
        assert_eq!(
            criteria(10, &[], false).stops_on_token(6, &[6]),
            Some(FinishReason::EosToken)
        );
        assert_eq!(criteria(10, &[], true).check(6, "", &[6]), None);
        assert_eq!(criteria(10, &[], true).stops_on_token(6, &[6]), None);
        // A stop sequence needs the text.
        assert_eq!(criteria(10, &["a"], false).stops_on_token(1, &[6]), None);
    }

    #[test]
    fn matches_stop_sequences_across_tokens_and_inside_a_token() {
        let mut c = criteria(100, &["a b"], false);
        assert_eq!(c.check(1, "xa", &[]), None);
        assert_eq!(c.check(0, " ", &[]), None);
        assert_eq!(c.check(2, "bc", &[]), Some(FinishReason::StopSequence));
        let mut c = criteria(100, &["."], false);
        assert_eq!(c.check(1, "a. b", &[]), Some(FinishReason::StopSequence));
    }

    #[test]
    fn old_matches_do_not_fire_again_and_multibyte_tails_are_safe() {
        let mut c = criteria(100, &["éé"], false);
        assert_eq!(c.check(1, "ééé", &[]), Some(FinishReason::StopSequence));
        let mut c = criteria(100, &["zz"], false);
        for _ in 0..10 {
            assert_eq!(c.check(1, "é", &[]), None);
        }
    }

    #[test]
    fn incremental_decoding_holds_back_split_characters() {
        let tok = tokenizer();
        // Prompt "a", then generated " ", "b", then "é" in two tokens, then ".".
        let ids = [1u32, 0, 2, 3, 4, 5];
        let mut decoder = IncrementalDecoder::new(1);
        let texts: Vec<String> = (2..=ids.len())
            .map(|n| decoder.next(&tok, &ids[..n]).unwrap())
            .collect();
        assert_eq!(texts, vec![" ", "b", "", "é", "."]);
        assert_eq!(decode_generated(&tok, &ids, 1).unwrap(), " bé.");
    }

    #[test]
    fn generated_text_skips_special_tokens() {
        let tok = tokenizer();
        assert_eq!(decode_generated(&tok, &[1, 2, 6], 1).unwrap(), "b");
        assert_eq!(decode_generated(&tok, &[1, 6], 1).unwrap(), "");
    }
}
