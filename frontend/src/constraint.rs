//! Constrained decoding: what a request's output must match (`response_format`,
//! `structured_outputs`), compiled by llguidance (the engine behind llama.cpp's `--llguidance`
//! and vLLM's guidance backend) into a matcher that masks each step's logits to the tokens that
//! keep the output valid.
//!
//! The scheduler compiles a request's [`Constraint`] before any work (a bad schema, regex or
//! grammar is the client's 400); the worker that samples rebuilds the matcher from the same
//! spec and replays the tokens already generated, so a sequence resumed elsewhere (failover,
//! re-prefill) continues under the same constraint. Compiled grammars are cached per spec.

use crate::tokenizer::{TokenId, Tokenizer};
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the generated text must match.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec", rename_all = "snake_case")]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid under this JSON Schema (its text, as the request gave it).
    JsonSchema(String),
    /// A regular expression matching the whole output.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A context-free grammar in llguidance's Lark syntax.
    Grammar(String),
}

/// A constraint that does not compile.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConstraintError {
    #[error("invalid {what}: {msg}")]
    Invalid { what: &'static str, msg: String },
    #[error("the model's vocabulary cannot be used for constrained decoding: {0}")]
    Vocabulary(String),
    #[error("constrained decoding failed: {0}")]
    Matcher(String),
}

impl Constraint {
    /// What kind of constraint this is, for messages.
    pub fn what(&self) -> &'static str {
        match self {
            Constraint::JsonObject => "json_object",
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::Regex(_) => "regex",
            Constraint::Choice(_) => "choice",
            Constraint::Grammar(_) => "grammar",
        }
    }

    /// The wire form (JSON), as the workers receive it.
    pub fn to_wire(&self) -> String {
        serde_json::to_string(self).expect("a constraint serializes")
    }

    pub fn from_wire(s: &str) -> Result<Constraint, String> {
        serde_json::from_str(s).map_err(|e| format!("a malformed constraint: {e}"))
    }

    fn grammar(&self) -> Result<TopLevelGrammar, ConstraintError> {
        let invalid = |msg: String| ConstraintError::Invalid {
            what: self.what(),
            msg,
        };
        Ok(match self {
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            Constraint::JsonSchema(s) => {
                let v: serde_json::Value =
                    serde_json::from_str(s).map_err(|e| invalid(e.to_string()))?;
                if !(v.is_object() || v.is_boolean()) {
                    return Err(invalid("a schema is an object".into()));
                }
                TopLevelGrammar::from_json_schema(compact(v))
            }
            Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
            Constraint::Choice(c) => {
                if c.is_empty() {
                    return Err(invalid("no choices".into()));
                }
                let alt: Vec<String> = c.iter().map(|s| escape_regex(s)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alt.join("|")))
            }
            Constraint::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// JSON laid out as Python's `json.dumps` does (`", "` and `": "`, no other whitespace) unless
/// the schema says otherwise (llguidance's `x-guidance` options): free whitespace lets a model
/// pad forever between tokens, the classic failure of small models under a JSON grammar.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut()
        && !o.contains_key("x-guidance")
    {
        o.insert(
            "x-guidance".into(),
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        );
    }
    schema
}

/// `s` as a regex matching itself only.
fn escape_regex(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/\"".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Compiled constraints for one tokenizer: the vocabulary's trie (built once) and a cache of
/// compiled grammars, each cloned per sequence.
pub struct Grammars {
    factory: ParserFactory,
    vocab: usize,
    cache: Mutex<HashMap<Constraint, Matcher>>,
}

/// Compiled grammars kept per process (the oldest half goes when full).
const CACHE: usize = 256;

impl Grammars {
    /// The trie of `tok`'s vocabulary: each token's bytes, control tokens marked as special
    /// (so no text matches them); EOS is the token that ends a complete output.
    pub fn new(tok: &Tokenizer) -> Result<Grammars, ConstraintError> {
        let vocab = tok.vocab_size();
        let words: Vec<Vec<u8>> = (0..vocab as TokenId)
            .map(|id| {
                let text = tok.token_bytes(id, false);
                if !tok.token_bytes(id, true).is_empty() {
                    return text.to_vec();
                }
                // A control token (or one without bytes): special, so no text matches it.
                let mut w = vec![toktrie::TokTrie::SPECIAL_TOKEN_MARKER];
                if text.is_empty() {
                    w.extend_from_slice(format!("<[{id}]>").as_bytes());
                } else {
                    w.extend_from_slice(text);
                }
                w
            })
            .collect();
        let eos = tok
            .eos
            .or_else(|| tok.eog.first().copied())
            .ok_or_else(|| ConstraintError::Vocabulary("no end-of-sequence token".into()))?;
        let info = toktrie::TokRxInfo::new(vocab as u32, eos);
        let trie = toktrie::TokTrie::from(&info, &words);
        let env: toktrie::TokEnv = Arc::new(toktrie::ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstraintError::Vocabulary(e.to_string()))?;
        factory.quiet();
        Ok(Grammars {
            factory,
            vocab,
            cache: Mutex::default(),
        })
    }

    /// A fresh matcher for `c` (compiled once per spec, then cloned).
    pub fn matcher(&self, c: &Constraint) -> Result<ConstraintMatcher, ConstraintError> {
        if let Some(m) = self.cache.lock().expect("grammar cache poisoned").get(c) {
            return Ok(ConstraintMatcher(m.clone(), None));
        }
        let parser =
            self.factory
                .create_parser(c.grammar()?)
                .map_err(|e| ConstraintError::Invalid {
                    what: c.what(),
                    msg: e.to_string(),
                })?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(ConstraintError::Invalid {
                what: c.what(),
                msg: e,
            });
        }
        let mut cache = self.cache.lock().expect("grammar cache poisoned");
        if cache.len() >= CACHE {
            let drop: Vec<Constraint> = cache.keys().take(CACHE / 2).cloned().collect();
            for k in drop {
                cache.remove(&k);
            }
        }
        cache.insert(c.clone(), m.clone());
        Ok(ConstraintMatcher(m, None))
    }

    /// Tokens in the vocabulary.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
}

/// One sequence's position in its constraint, and the next token's mask once computed.
#[derive(Clone)]
pub struct ConstraintMatcher(Matcher, Option<llguidance::toktrie::SimpleVob>);

impl std::fmt::Debug for ConstraintMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintMatcher")
            .field("stopped", &self.0.is_stopped())
            .finish()
    }
}

impl ConstraintMatcher {
    fn err(&self, e: impl std::fmt::Display) -> ConstraintError {
        ConstraintError::Matcher(e.to_string())
    }

    /// Computes which tokens may come next, ahead of [`mask`](Self::mask): the decode loop
    /// calls it while the forward pass computes the logits.
    pub fn prepare(&mut self) -> Result<(), ConstraintError> {
        if self.1.is_none() {
            self.1 = Some(self.0.compute_mask().map_err(|e| self.err(e))?);
        }
        Ok(())
    }

    /// Sets to −∞ the logits of tokens the constraint does not allow next (the mask
    /// [`prepare`](Self::prepare) computed, or computed now).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        self.prepare()?;
        let allowed = self.1.as_ref().expect("prepared above");
        for (i, v) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(i as TokenId) {
                *v = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past `token` (which the mask allowed).
    pub fn consume(&mut self, token: TokenId) -> Result<(), ConstraintError> {
        self.1 = None;
        self.0.consume_token(token).map_err(|e| self.err(e))
    }

    /// Advances past tokens generated before this matcher existed (a resumed sequence).
    pub fn replay(&mut self, tokens: &[TokenId]) -> Result<(), ConstraintError> {
        self.1 = None;
        self.0.consume_tokens(tokens).map_err(|e| self.err(e))
    }

    /// Whether the output is complete: nothing more may follow.
    pub fn is_stopped(&self) -> bool {
        self.0.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_round_trip_on_the_wire() {
        for c in [
            Constraint::JsonObject,
            Constraint::JsonSchema(r#"{"type":"integer"}"#.into()),
            Constraint::Regex("[a-z]+".into()),
            Constraint::Choice(vec!["yes".into(), "no \"quoted\"".into()]),
            Constraint::Grammar("start: \"a\"+".into()),
        ] {
            assert_eq!(Constraint::from_wire(&c.to_wire()).unwrap(), c);
        }
        assert!(Constraint::from_wire("{\"kind\":\"nope\"}").is_err());
    }

    #[test]
    fn regex_escaping_matches_literally() {
        assert_eq!(escape_regex("a.b|c"), "a\\.b\\|c");
        assert_eq!(escape_regex("plain"), "plain");
    }
}
