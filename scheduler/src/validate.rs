//! Request validation: every field is checked here, once, and turned into the worker's
//! [`GenerationParams`]; anything out of range is a 400 naming the field.

use crate::error::ApiError;
use crate::protocol::SamplingFields;
use frontend::request::GenerationParams;
use frontend::sampling::SamplingParams;

/// Most choices one request may ask for.
pub const MAX_N: u32 = 16;
/// Most stop strings one request may give.
pub const MAX_STOPS: usize = 16;
/// Most top log-probabilities per token.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Longest stop string, in bytes (each is matched against the text after every token).
pub const MAX_STOP_BYTES: usize = 256;
/// Most `stop_token_ids` one request may give.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// Most prompts one completions request may carry.
pub const MAX_PROMPTS: usize = 64;
/// Most choices (prompts × `n`) one request may ask for: each is a sequence in the batch.
pub const MAX_CHOICES: usize = 64;

/// A validated request, ready to be split into choices.
#[derive(Debug, Clone)]
pub struct Plan {
    pub params: GenerationParams,
    pub n: usize,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

fn range(
    v: Option<f32>,
    lo: f32,
    hi: f32,
    lo_open: bool,
    name: &'static str,
) -> Result<(), ApiError> {
    if let Some(x) = v {
        let ok = x.is_finite() && (if lo_open { x > lo } else { x >= lo }) && x <= hi;
        if !ok {
            let lb = if lo_open { "(" } else { "[" };
            return Err(ApiError::invalid(
                format!("{name} must be in {lb}{lo}, {hi}], got {x}"),
                name,
            ));
        }
    }
    Ok(())
}

/// How `max_tokens` is chosen when the client gives none.
#[derive(Debug, Clone, Copy)]
pub enum DefaultMax {
    /// Whatever context remains (chat, as vLLM does).
    RemainingContext,
    /// A fixed number (OpenAI's legacy completions default is 16).
    Fixed(usize),
}

/// What [`plan`] checks a request against.
pub struct PlanInput<'a> {
    pub sampling: &'a SamplingFields,
    pub max_tokens: Option<u32>,
    pub default_max: DefaultMax,
    /// Smallest `max_tokens` the endpoint accepts (chat: 1; completions: 0, for scoring).
    pub min_max_tokens: u32,
    /// Top log-probabilities per generated token, if asked for.
    pub logprobs: Option<u32>,
    /// Top log-probabilities per prompt token, if asked for.
    pub prompt_logprobs: Option<u32>,
    /// Tokens in the (longest) prompt.
    pub prompt_len: usize,
    pub max_context: usize,
    /// The field that holds the prompt, for error messages.
    pub prompt_param: &'static str,
    /// The model (vocabulary size, constrained decoding).
    pub frontend: &'a frontend::Frontend,
}

/// Validates a request's sampling fields and lengths.
pub fn plan(input: PlanInput<'_>) -> Result<Plan, ApiError> {
    let PlanInput {
        sampling: f,
        max_tokens,
        default_max,
        min_max_tokens,
        logprobs,
        prompt_logprobs,
        prompt_len,
        max_context,
        prompt_param,
        frontend,
    } = input;
    crate::structured::refuse_unsupported(f)?;
    let logit_bias = crate::structured::logit_bias(f, frontend.tokenizer.vocab_size())?;
    let constraint = crate::structured::constraint(f)?;
    range(f.temperature, 0.0, 2.0, false, "temperature")?;
    range(f.top_p, 0.0, 1.0, true, "top_p")?;
    range(f.min_p, 0.0, 1.0, false, "min_p")?;
    range(f.frequency_penalty, -2.0, 2.0, false, "frequency_penalty")?;
    range(f.presence_penalty, -2.0, 2.0, false, "presence_penalty")?;
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k >= 1 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                format!("top_k must be -1 (disabled) or at least 1, got {k}"),
                "top_k",
            ));
        }
    };
    let n = f.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::invalid(
            format!("n must be between 1 and {MAX_N}, got {n}"),
            "n",
        ));
    }
    let stops = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            format!("at most {MAX_STOPS} stop sequences are allowed"),
            "stop",
        ));
    }
    if let Some(long) = stops.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            format!(
                "stop sequences may be at most {MAX_STOP_BYTES} bytes long, got {}",
                long.len()
            ),
            "stop",
        ));
    }
    let stop_ids = f.stop_token_ids.as_ref().map_or(0, Vec::len);
    if stop_ids > MAX_STOP_TOKEN_IDS {
        return Err(ApiError::invalid(
            format!("at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got {stop_ids}"),
            "stop_token_ids",
        ));
    }
    for lp in [logprobs, prompt_logprobs].into_iter().flatten() {
        if lp > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(
                format!("logprobs must be at most {MAX_TOP_LOGPROBS}, got {lp}"),
                "logprobs",
            ));
        }
    }
    if prompt_len == 0 {
        return Err(ApiError::invalid("the prompt is empty", prompt_param));
    }
    if prompt_len >= max_context {
        return Err(context_error(max_context, prompt_len, 0, prompt_param));
    }
    let room = max_context - prompt_len;
    let max_tokens = match max_tokens {
        Some(m) if m < min_max_tokens => {
            return Err(ApiError::invalid(
                format!("max_tokens must be at least {min_max_tokens}, got {m}"),
                "max_tokens",
            ));
        }
        Some(m) if m as usize > room => {
            return Err(context_error(
                max_context,
                prompt_len,
                m as usize,
                prompt_param,
            ));
        }
        Some(m) => m as usize,
        None => match default_max {
            DefaultMax::RemainingContext => room,
            DefaultMax::Fixed(k) => k.min(room),
        },
    };
    let min_tokens = f.min_tokens.unwrap_or(0) as usize;
    if min_tokens > max_tokens {
        return Err(ApiError::invalid(
            format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})"),
            "min_tokens",
        ));
    }
    let seed = match f.seed {
        Some(s) => s as u64,
        None => uuid::Uuid::new_v4().as_u64_pair().0,
    };
    let stream = f.stream.unwrap_or(false);
    if f.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options is only allowed when stream is true",
            "stream_options",
        ));
    }
    if let Some(c) = &constraint {
        let param = if f.response_format.is_some() {
            "response_format"
        } else {
            "structured_outputs"
        };
        crate::structured::compile(frontend, c, param)?;
    }
    Ok(Plan {
        params: GenerationParams {
            sampling: SamplingParams {
                temperature: f.temperature.unwrap_or(1.0),
                top_k,
                top_p: f.top_p.unwrap_or(1.0),
                min_p: f.min_p.unwrap_or(0.0),
                frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
                presence_penalty: f.presence_penalty.unwrap_or(0.0),
                seed,
            },
            max_tokens,
            min_tokens,
            ignore_eos: f.ignore_eos.unwrap_or(false),
            stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
            logprobs: logprobs.map(|v| v as usize),
            prompt_logprobs: prompt_logprobs.map(|v| v as usize),
            logit_bias,
            constraint,
        },
        n: n as usize,
        stops,
        stream,
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

fn context_error(max: usize, prompt: usize, completion: usize, param: &'static str) -> ApiError {
    ApiError::InvalidRequest {
        message: format!(
            "This model's maximum context length is {max} tokens. However, you requested {} tokens ({prompt} in the {param}, {completion} in the completion). Please reduce the length of the {param} or completion.",
            prompt + completion
        ),
        param: Some(param.to_string()),
        code: Some("context_length_exceeded"),
    }
}

/// The context error for a prompt of `bytes` bytes that is sure to exceed `max` tokens,
/// refused before tokenizing it.
pub fn too_long(max: usize, bytes: usize, param: &'static str) -> ApiError {
    ApiError::InvalidRequest {
        message: format!(
            "This model's maximum context length is {max} tokens. However, the {param} ({bytes} bytes) is longer than that. Please reduce the length of the {param}."
        ),
        param: Some(param.to_string()),
        code: Some("context_length_exceeded"),
    }
}
