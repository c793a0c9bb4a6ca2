//! What a request asks of the output's shape, checked: `response_format` (OpenAI), vLLM's
//! `structured_outputs`, `logit_bias` — and the OpenAI fields Tandem does not implement, which
//! would change what is generated and so are refused with a 400 naming them rather than
//! dropped.

use crate::error::ApiError;
use crate::protocol::SamplingFields;
use frontend::Frontend;
use frontend::TokenId;
use frontend::constraint::Constraint;
use serde_json::Value;

/// Longest schema, regex or grammar text accepted, in bytes.
pub const MAX_CONSTRAINT_BYTES: usize = 64 << 10;
/// Most `logit_bias` entries (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most `choice` strings.
pub const MAX_CHOICES: usize = 256;

/// Refuses fields that would change the output and that Tandem does not implement.
pub fn refuse_unsupported(f: &SamplingFields) -> Result<(), ApiError> {
    let present = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    for (name, v) in [
        ("prediction", &f.prediction),
        ("audio", &f.audio),
        ("web_search_options", &f.web_search_options),
        ("functions", &f.functions),
        ("function_call", &f.function_call),
    ] {
        if present(v) {
            return Err(ApiError::invalid(
                format!("{name} is not supported by this server"),
                name,
            ));
        }
    }
    if let Some(m) = f.modalities.as_ref().filter(|v| !v.is_null()) {
        let text_only = m
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x.as_str() == Some("text")));
        if !text_only {
            return Err(ApiError::invalid(
                "only the text modality is supported",
                "modalities",
            ));
        }
    }
    Ok(())
}

fn text_of<'a>(v: &'a Value, what: &str, param: &'static str) -> Result<&'a str, ApiError> {
    let s = v
        .as_str()
        .ok_or_else(|| ApiError::invalid(format!("{what} must be a string"), param))?;
    if s.len() > MAX_CONSTRAINT_BYTES {
        return Err(ApiError::invalid(
            format!("{what} may be at most {MAX_CONSTRAINT_BYTES} bytes"),
            param,
        ));
    }
    Ok(s)
}

fn schema_text(v: &Value, param: &'static str) -> Result<String, ApiError> {
    // A schema given as a string (vLLM accepts both) or as an object.
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Object(_) | Value::Bool(_) => v.to_string(),
        _ => return Err(ApiError::invalid("a JSON schema must be an object", param)),
    };
    if s.len() > MAX_CONSTRAINT_BYTES {
        return Err(ApiError::invalid(
            format!("a JSON schema may be at most {MAX_CONSTRAINT_BYTES} bytes"),
            param,
        ));
    }
    Ok(s)
}

/// The constraint `response_format` or `structured_outputs` asks for (at most one of them).
pub fn constraint(f: &SamplingFields) -> Result<Option<Constraint>, ApiError> {
    let rf = f.response_format.as_ref().filter(|v| !v.is_null());
    let so = f.structured_outputs.as_ref().filter(|v| !v.is_null());
    if rf.is_some() && so.is_some() {
        return Err(ApiError::invalid(
            "give response_format or structured_outputs, not both",
            "structured_outputs",
        ));
    }
    if let Some(rf) = rf {
        const P: &str = "response_format";
        let kind = rf
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid("response_format.type is required", P))?;
        return match kind {
            "text" => Ok(None),
            "json_object" => Ok(Some(Constraint::JsonObject)),
            "json_schema" => {
                let js = rf.get("json_schema").ok_or_else(|| {
                    ApiError::invalid("response_format.json_schema is required", P)
                })?;
                // `strict` is accepted either way: the schema is always enforced.
                let schema = js.get("schema").ok_or_else(|| {
                    ApiError::invalid("response_format.json_schema.schema is required", P)
                })?;
                Ok(Some(Constraint::JsonSchema(schema_text(schema, P)?)))
            }
            other => Err(ApiError::invalid(
                format!(
                    "response_format.type must be text, json_object or json_schema, got {other:?}"
                ),
                P,
            )),
        };
    }
    let Some(so) = so else { return Ok(None) };
    const P: &str = "structured_outputs";
    let obj = so
        .as_object()
        .ok_or_else(|| ApiError::invalid("structured_outputs must be an object", P))?;
    let mut given = obj.iter().filter(|(k, v)| {
        !v.is_null()
            && matches!(
                k.as_str(),
                "json" | "regex" | "choice" | "grammar" | "json_object"
            )
    });
    let (Some((kind, v)), None) = (given.next(), given.next()) else {
        return Err(ApiError::invalid(
            "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
            P,
        ));
    };
    Ok(Some(match kind.as_str() {
        "json" => Constraint::JsonSchema(schema_text(v, P)?),
        "regex" => Constraint::Regex(text_of(v, "structured_outputs.regex", P)?.to_string()),
        "grammar" => Constraint::Grammar(text_of(v, "structured_outputs.grammar", P)?.to_string()),
        "json_object" if v.as_bool() == Some(true) => Constraint::JsonObject,
        "json_object" => {
            return Err(ApiError::invalid(
                "structured_outputs.json_object must be true",
                P,
            ));
        }
        _ => {
            let arr = v.as_array().ok_or_else(|| {
                ApiError::invalid("structured_outputs.choice must be a list of strings", P)
            })?;
            if arr.is_empty() || arr.len() > MAX_CHOICES {
                return Err(ApiError::invalid(
                    format!("structured_outputs.choice takes 1 to {MAX_CHOICES} strings"),
                    P,
                ));
            }
            let mut choices = Vec::with_capacity(arr.len());
            for c in arr {
                choices.push(text_of(c, "each choice", P)?.to_string());
            }
            Constraint::Choice(choices)
        }
    }))
}

/// Compiles `c` for this tokenizer (cached per spec): an invalid schema, regex or grammar is
/// the client's 400, found before any work.
pub fn compile(fe: &Frontend, c: &Constraint, param: &'static str) -> Result<(), ApiError> {
    let grammars = fe
        .grammars()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    grammars
        .matcher(c)
        .map(drop)
        .map_err(|e| ApiError::invalid(e.to_string(), param))
}

/// `logit_bias`: token ids (as strings, OpenAI's form) to biases in [-100, 100].
pub fn logit_bias(f: &SamplingFields, vocab: usize) -> Result<Vec<(TokenId, f32)>, ApiError> {
    const P: &str = "logit_bias";
    let Some(v) = f.logit_bias.as_ref().filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let map = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("logit_bias must map token ids to numbers", P))?;
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid(
            format!("logit_bias takes at most {MAX_LOGIT_BIAS} tokens"),
            P,
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, b) in map {
        let id: TokenId = k
            .parse()
            .ok()
            .filter(|&id: &TokenId| (id as usize) < vocab)
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("logit_bias: {k:?} is not a token id of this model (0..{vocab})"),
                    P,
                )
            })?;
        let bias = b
            .as_f64()
            .filter(|b| b.is_finite() && (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("logit_bias: the bias of {k} must be in [-100, 100]"),
                    P,
                )
            })?;
        out.push((id, bias as f32));
    }
    out.sort_by_key(|&(id, _)| id);
    out.dedup_by_key(|&mut (id, _)| id);
    Ok(out)
}
