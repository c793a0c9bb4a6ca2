//! Tool calling: `tools`, `tool_choice`, `parallel_tool_calls`, and `tool_calls` in the answer.
//!
//! Calls are parsed in the Hermes convention that vLLM's `hermes` parser and llama.cpp read:
//! `<tool_call>\n{"name": "…", "arguments": {…}}\n</tool_call>`. A template with that tool
//! syntax (Qwen2.5 and its kin: `frontend::chat::ChatTemplate::renders_tools`) gets the tools,
//! the assistant messages' `tool_calls` and the `role: tool` messages as they are and renders
//! them itself. The default model's template (ChatML) has none, so for it and any other
//! Tandem writes the convention in: the tools are described in the system prompt, an
//! assistant message's `tool_calls` render back as such blocks and a `role: tool` message's
//! content inside `<tool_response>…</tool_response>`. With `tool_choice` `required` or a named function the
//! calls are enforced by a grammar (each function's `parameters` schema embedded), so even a
//! small model produces valid calls; with `auto` the model chooses and its output is parsed.
//!
//! [`stream`] takes the calls out of generated text, streamed or whole.

use crate::error::ApiError;
use crate::protocol::SamplingFields;
use frontend::chat::ChatMessage;
use frontend::constraint::Constraint;
use serde_json::{Value, json};

/// Most tools one request may describe.
pub const MAX_TOOLS: usize = 128;

pub(crate) const OPEN: &str = "<tool_call>";
pub(crate) const CLOSE: &str = "</tool_call>";

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's tools, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: Choice,
    pub parallel: bool,
}

fn bad(msg: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::invalid(msg, param)
}

/// The request's tools; `None` when it has none or `tool_choice` is `none`.
pub fn parse(f: &SamplingFields) -> Result<Option<Tools>, ApiError> {
    let list = match f.tools.as_ref().filter(|v| !v.is_null()) {
        None => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(bad("tools must be a list", "tools")),
    };
    if list.len() > MAX_TOOLS {
        return Err(bad(
            format!("at most {MAX_TOOLS} tools are allowed"),
            "tools",
        ));
    }
    let mut tools = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(
                format!("tools[{i}].type must be \"function\""),
                "tools",
            ));
        }
        let f = t
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| bad(format!("tools[{i}].function is required"), "tools"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| {
                !n.is_empty()
                    && n.len() <= 64
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
            .ok_or_else(|| {
                bad(
                    format!("tools[{i}].function.name must be 1 to 64 letters, digits, _ or -"),
                    "tools",
                )
            })?;
        if tools.iter().any(|t: &Tool| t.name == name) {
            return Err(bad(format!("two tools are named {name:?}"), "tools"));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object"}),
            Some(p) if p.is_object() => p.clone(),
            Some(_) => {
                return Err(bad(
                    format!("tools[{i}].function.parameters must be a JSON Schema object"),
                    "tools",
                ));
            }
        };
        tools.push(Tool {
            name: name.to_string(),
            description: f
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
            parameters,
        });
    }
    let choice = match f.tool_choice.as_ref().filter(|v| !v.is_null()) {
        None => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => {
                return Err(bad(
                    format!(
                        "tool_choice must be none, auto, required or a function, got {other:?}"
                    ),
                    "tool_choice",
                ));
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad(
                        "tool_choice must be {\"type\": \"function\", \"function\": {\"name\": …}}",
                        "tool_choice",
                    )
                })?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(bad(
                    format!("tool_choice names {name:?}, which is not among the tools"),
                    "tool_choice",
                ));
            }
            Choice::Named(name.to_string())
        }
    };
    if tools.is_empty() {
        return match choice {
            Choice::Required | Choice::Named(_) => {
                Err(bad("tool_choice requires tools", "tool_choice"))
            }
            _ => Ok(None),
        };
    }
    if choice == Choice::None {
        return Ok(None);
    }
    Ok(Some(Tools {
        tools,
        choice,
        parallel: f.parallel_tool_calls.unwrap_or(true),
    }))
}

impl Tools {
    /// The system-prompt text describing the tools and how to call them.
    pub fn preamble(&self) -> String {
        let mut s = String::from(
            "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about what values to plug into functions. Here are the available tools: <tools>",
        );
        for t in self.openai_list().as_array().into_iter().flatten() {
            s.push('\n');
            s.push_str(&t.to_string());
        }
        s.push_str("\n</tools>\nFor each function call return a json object with function name and arguments within <tool_call></tool_call> XML tags as follows:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-dict>}\n</tool_call>");
        s
    }

    /// The tools in OpenAI's form, for a template that describes them itself.
    pub fn openai_list(&self) -> Value {
        Value::Array(
            self.tools
                .iter()
                .map(|t| {
                    let mut f = json!({"name": t.name, "parameters": t.parameters});
                    if let Some(d) = &t.description {
                        f["description"] = json!(d);
                    }
                    json!({"type": "function", "function": f})
                })
                .collect(),
        )
    }

    /// Puts the preamble into the conversation: before the system message's text, or as a
    /// system message of its own.
    pub fn describe(&self, msgs: &mut Vec<ChatMessage>) {
        let pre = self.preamble();
        match msgs.first_mut() {
            Some(m) if m.role == "system" || m.role == "developer" => {
                m.content = format!("{pre}\n\n{}", m.content);
            }
            _ => msgs.insert(0, ChatMessage::new("system", pre)),
        }
    }

    /// The grammar that forces calls (`required`, or a named function); `None` for `auto`.
    pub fn constraint(&self) -> Option<Constraint> {
        let callable: Vec<&Tool> = match &self.choice {
            Choice::Required => self.tools.iter().collect(),
            Choice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
            Choice::Auto | Choice::None => return None,
        };
        let mut g = String::new();
        if self.parallel && self.choice == Choice::Required {
            g.push_str("start: call (\"\\n\" call)*\n");
        } else {
            g.push_str("start: call\n");
        }
        let alts: Vec<String> = (0..callable.len()).map(|i| format!("f{i}")).collect();
        g.push_str(&format!(
            "call: \"{OPEN}\\n\" ({}) \"\\n{CLOSE}\"\n",
            alts.join(" | ")
        ));
        for (i, t) in callable.iter().enumerate() {
            let schema = json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
                "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
            });
            g.push_str(&format!("f{i}: %json {schema}\n"));
        }
        Some(Constraint::Grammar(g))
    }
}

/// An assistant message's `tool_calls` for a template that renders them: OpenAI's form, each
/// `function.arguments` parsed to an object (what Hugging Face templates read).
pub fn native_calls(calls: &[Value]) -> Result<Value, String> {
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        let (name, args) = name_and_args(c)?;
        let mut c = c.clone();
        c["function"] = json!({"name": name, "arguments": args});
        out.push(c);
    }
    Ok(Value::Array(out))
}

/// A call's function name and its arguments as a JSON value.
fn name_and_args(c: &Value) -> Result<(&str, Value), String> {
    let f = c.get("function").ok_or("a tool call without function")?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or("a tool call without a name")?;
    let args: Value = match f.get("arguments") {
        Some(Value::String(s)) => {
            serde_json::from_str(s).map_err(|e| format!("arguments are not JSON: {e}"))?
        }
        Some(v) => v.clone(),
        None => json!({}),
    };
    Ok((name, args))
}

/// Renders an assistant message's `tool_calls` (OpenAI's form) as the model writes them.
pub fn render_calls(calls: &[Value]) -> Result<String, String> {
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        let (name, args) = name_and_args(c)?;
        out.push(format!(
            "{OPEN}\n{{\"name\": {}, \"arguments\": {args}}}\n{CLOSE}",
            json!(name)
        ));
    }
    Ok(out.join("\n"))
}

/// A `role: tool` message's content as the model reads it.
pub fn render_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

mod stream;

pub use stream::{CallStream, split};

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn tools(choice: Value, parallel: Option<bool>) -> Result<Option<Tools>, ApiError> {
        let f: SamplingFields = serde_json::from_value(json!({
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
                {"type": "function", "function": {"name": "add"}}
            ],
            "tool_choice": choice,
            "parallel_tool_calls": parallel,
        }))
        .unwrap();
        parse(&f)
    }

    #[test]
    fn choices_parse_and_bad_ones_are_refused() {
        assert_eq!(
            tools(json!("auto"), None).unwrap().unwrap().choice,
            Choice::Auto
        );
        assert!(tools(json!("none"), None).unwrap().is_none());
        let named = tools(
            json!({"type": "function", "function": {"name": "add"}}),
            Some(false),
        );
        assert_eq!(named.unwrap().unwrap().choice, Choice::Named("add".into()));
        for bad in [
            json!("sometimes"),
            json!({"type": "function", "function": {"name": "nope"}}),
            json!({"function": {"name": "add"}}),
        ] {
            assert!(tools(bad.clone(), None).is_err(), "{bad}");
        }
        let f: SamplingFields = serde_json::from_value(json!({"tool_choice": "required"})).unwrap();
        assert!(parse(&f).is_err(), "required without tools");
        let f: SamplingFields = serde_json::from_value(
            json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
        )
        .unwrap();
        assert!(parse(&f).is_err(), "a name with a space");
    }

    #[test]
    fn assistant_calls_render_back_in_the_models_form() {
        let r = render_calls(&[json!({"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": "{\"a\": 1}"}})])
        .unwrap();
        assert_eq!(
            r,
            "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\":1}}\n</tool_call>"
        );
        assert!(render_calls(&[json!({"function": {"name": "add", "arguments": "{"}})]).is_err());
    }
}
