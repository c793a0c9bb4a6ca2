//! Byte-level BPE built from a GGUF's `tokenizer.ggml.*` metadata, matching llama.cpp.
//!
//! Encoding uses the `tokenizers` crate (BPE over GGUF's vocab and merges, with the
//! pre-tokenizer that `tokenizer.ggml.pre` names); control and user-defined tokens are matched
//! in the text first, as llama.cpp does when it parses special tokens. Decoding is done here,
//! byte-exact, so that streaming can hold back an incomplete UTF-8 character
//! ([`StreamDecoder`]).

use crate::bpe::Bpe;
use crate::error::{ModelError, Result};
use crate::gguf::{Metadata, Value};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Token ids as the model sees them.
pub type TokenId = u32;

/// GGUF token types (`tokenizer.ggml.token_type`).
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// GPT-2's pre-tokenizer split.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's (`llama-bpe`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizers` pipeline (pre-tokenizer, special tokens) over [`Bpe`].
type Inner = tokenizers::TokenizerImpl<
    Bpe,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// A model's tokenizer.
pub struct Tokenizer {
    inner: Inner,
    /// Each token's bytes (byte-level symbols mapped back; specials as their text): one
    /// buffer, token `i` ending at `token_ends[i]`.
    token_bytes: Vec<u8>,
    token_ends: Vec<usize>,
    /// Control tokens are not rendered into generated text.
    is_control: Vec<bool>,
    /// The longest token, in bytes: no token covers more of the input text.
    max_token_bytes: usize,
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    /// Extra end-of-generation tokens (`tokenizer.ggml.eot_token_id`, ...).
    pub eog: Vec<TokenId>,
    pub add_bos: bool,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// GPT-2's byte ↔ printable-unicode table.
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("in range")
        };
    }
    table
}

impl Tokenizer {
    pub fn from_metadata(md: &impl Metadata) -> Result<Tokenizer> {
        let model = md.str_req("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer model '{model}' is not supported yet (Tandem reads byte-level BPE, 'gpt2')"
            )));
        }
        let tokens = md
            .strings_opt("tokenizer.ggml.tokens")?
            .ok_or_else(|| ModelError::MissingKey("tokenizer.ggml.tokens".into()))?;
        let types: Vec<i64> = match md.array_opt("tokenizer.ggml.token_type")? {
            Some(a) => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => *x as i64,
                    other => other.as_u64().map(|x| x as i64).unwrap_or(1),
                })
                .collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(tok_err("token_type and tokens differ in length"));
        }
        let merges = md
            .strings_opt("tokenizer.ggml.merges")?
            .ok_or_else(|| ModelError::MissingKey("tokenizer.ggml.merges".into()))?;
        let bpe = Bpe::new(tokens.clone(), merges).map_err(tok_err)?;
        let mut inner = Inner::new(bpe);

        let pre = md.str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
        let split = |pat: &str| -> Result<PreTokenizerWrapper> {
            Ok(Split::new(
                SplitPattern::Regex(pat.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?
            .into())
        };
        let bytes_only: PreTokenizerWrapper = ByteLevel::new(false, false, false).into();
        let pre_tok: PreTokenizerWrapper = match pre {
            // llama.cpp: "\p{N}" isolated, then GPT-2's split.
            "smollm" => {
                Sequence::new(vec![split(r"\p{N}")?, split(GPT2_PATTERN)?, bytes_only]).into()
            }
            "gpt2" | "default" | "gpt-2" => {
                Sequence::new(vec![split(GPT2_PATTERN)?, bytes_only]).into()
            }
            "llama-bpe" | "llama3" => {
                Sequence::new(vec![split(LLAMA3_PATTERN)?, bytes_only]).into()
            }
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "pre-tokenizer '{other}' is not supported yet (supported: smollm, gpt2, llama-bpe)"
                )));
            }
        };
        inner.with_pre_tokenizer(Some(pre_tok));

        let special = |ty: &i64| *ty == TYPE_CONTROL || *ty == TYPE_USER_DEFINED;
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| special(t))
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(tok_err)?;

        // Byte-level symbols back to bytes; every symbol is below U+0200.
        let mut inverse = [None; 0x200];
        for (b, c) in byte_to_char().iter().enumerate() {
            inverse[*c as usize] = Some(b as u8);
        }
        let mut token_bytes = Vec::with_capacity(tokens.iter().map(str::len).sum());
        let mut token_ends = Vec::with_capacity(tokens.len());
        let mut max_token_bytes = 1;
        for (t, ty) in tokens.iter().zip(&types) {
            let start = token_bytes.len();
            if special(ty) {
                token_bytes.extend_from_slice(t.as_bytes());
            } else {
                token_bytes.extend(
                    t.chars()
                        .map(|c| inverse.get(c as usize).copied().flatten().unwrap_or(b'?')),
                );
            }
            token_ends.push(token_bytes.len());
            max_token_bytes = max_token_bytes.max(token_bytes.len() - start);
        }
        let id = |k: &str| -> Result<Option<TokenId>> {
            Ok(md
                .u64_opt(k)?
                .map(|v| v as TokenId)
                .filter(|v| (*v as usize) < tokens.len()))
        };
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let mut eog: Vec<TokenId> = [
            id("tokenizer.ggml.eot_token_id")?,
            id("tokenizer.ggml.eom_token_id")?,
        ]
        .into_iter()
        .flatten()
        .collect();
        eog.extend(eos);
        eog.sort_unstable();
        eog.dedup();
        Ok(Tokenizer {
            inner,
            max_token_bytes,
            token_bytes,
            token_ends,
            is_control: types.iter().map(|t| *t == TYPE_CONTROL).collect(),
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos,
            eog,
            add_bos: md
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.token_ends.len()
    }

    /// Tokenizes `text`, matching special tokens written in it; adds BOS if `add_special`
    /// and the model asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<TokenId>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Whether `text` is sure to take more than `tokens` tokens, told from its length alone
    /// (no token covers more than the longest token's bytes): lets a request far past the
    /// context be refused before the tokenizer spends memory and time on it.
    pub fn surely_longer_than(&self, text: &str, tokens: usize) -> bool {
        text.len() > tokens.saturating_mul(self.max_token_bytes)
    }

    /// The raw bytes of one token (empty for control tokens when `skip_control`).
    pub fn token_bytes(&self, id: TokenId, skip_control: bool) -> &[u8] {
        let i = id as usize;
        match self.token_ends.get(i) {
            Some(_) if skip_control && self.is_control[i] => &[],
            Some(&end) => {
                &self.token_bytes[i.checked_sub(1).map_or(0, |j| self.token_ends[j])..end]
            }
            None => &[],
        }
    }

    /// The text of one token as the API shows it in `logprobs` (lossy for partial UTF-8).
    pub fn token_text(&self, id: TokenId) -> String {
        String::from_utf8_lossy(self.token_bytes(id, false)).into_owned()
    }

    /// Decodes ids to text, skipping control tokens (what `skip_special_tokens` does).
    pub fn decode(&self, ids: &[TokenId]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i, true).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn is_eog(&self, id: TokenId) -> bool {
        self.eog.contains(&id)
    }

    /// The text of a token id, if it exists (for `bos_token`/`eos_token` in templates).
    pub fn raw_token(&self, id: Option<TokenId>) -> String {
        id.map(|i| String::from_utf8_lossy(self.token_bytes(i, false)).into_owned())
            .unwrap_or_default()
    }
}

/// Turns a stream of token ids into text pieces, holding back bytes of a UTF-8 character
/// that has not been completed yet.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Adds a token; returns the text that became complete.
    pub fn push(&mut self, tok: &Tokenizer, id: TokenId) -> String {
        self.pending.extend_from_slice(tok.token_bytes(id, true));
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_some() => {
                // Invalid bytes (not just incomplete): emit lossily, as a batch decode would.
                let s = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                return s;
            }
            Err(e) => e.valid_up_to(),
        };
        let s = String::from_utf8(self.pending[..valid].to_vec()).expect("validated");
        self.pending.drain(..valid);
        s
    }

    /// Whatever is left at the end of generation.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
