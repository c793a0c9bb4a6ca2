//! Tool calling: `tools`, `tool_choice`, `parallel_tool_calls`, and `tool_calls` in the answer.
//!
//! The default model's chat template (ChatML) has no tool syntax, so Tandem uses the Hermes
//! convention that vLLM's `hermes` parser and llama.cpp read: the tools are described in the
//! system prompt, the model calls one as
//! `<tool_call>\n{"name": "…", "arguments": {…}}\n</tool_call>`, an assistant message's
//! `tool_calls` render back in that form and a `role: tool` message's content inside
//! `<tool_response>…</tool_response>`. With `tool_choice` `required` or a named function the
//! calls are enforced by a grammar (each function's `parameters` schema embedded), so even a
//! small model produces valid calls; with `auto` the model chooses and its output is parsed.
//! (A model template's own tool syntax is not used yet: every model gets this convention.)

use crate::error::ApiError;
use crate::protocol::{FunctionCall, SamplingFields, ToolCall};
use frontend::chat::ChatMessage;
use frontend::constraint::Constraint;
use serde_json::{Value, json};

/// Most tools one request may describe.
pub const MAX_TOOLS: usize = 128;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

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
        for t in &self.tools {
            let mut f = json!({"name": t.name, "parameters": t.parameters});
            if let Some(d) = &t.description {
                f["description"] = json!(d);
            }
            s.push('\n');
            s.push_str(&json!({"type": "function", "function": f}).to_string());
        }
        s.push_str("\n</tools>\nFor each function call return a json object with function name and arguments within <tool_call></tool_call> XML tags as follows:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-dict>}\n</tool_call>");
        s
    }

    /// Puts the preamble into the conversation: before the system message's text, or as a
    /// system message of its own.
    pub fn describe(&self, msgs: &mut Vec<ChatMessage>) {
        let pre = self.preamble();
        match msgs.first_mut() {
            Some(m) if m.role == "system" || m.role == "developer" => {
                m.content = format!("{pre}\n\n{}", m.content);
            }
            _ => msgs.insert(
                0,
                ChatMessage {
                    role: "system".into(),
                    content: pre,
                },
            ),
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

/// Renders an assistant message's `tool_calls` (OpenAI's form) as the model writes them.
pub fn render_calls(calls: &[Value]) -> Result<String, String> {
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
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

/// Splits generated text into its content and the calls it makes (blocks that parse as
/// `{"name": …, "arguments": {…}}` naming one of `tools`; anything else stays content).
pub fn split(text: &str, tools: &Tools) -> (String, Vec<ToolCall>) {
    let mut s = CallStream::default();
    let (mut content, calls) = s.push(text, tools);
    content.push_str(&s.finish());
    if !calls.is_empty() {
        content = content.trim().to_string();
    }
    (content, calls)
}

fn call_of(body: &str, tools: &Tools) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?;
    if !tools.tools.iter().any(|t| t.name == name) {
        return None;
    }
    let args = v.get("arguments").cloned().unwrap_or_else(|| json!({}));
    if !args.is_object() {
        return None;
    }
    Some(ToolCall {
        id: format!("call_{}", uuid::Uuid::new_v4().simple()),
        kind: "function",
        function: FunctionCall {
            name: name.to_string(),
            arguments: args.to_string(),
        },
    })
}

/// Streams a choice's text, holding back what may be a tool call until it is complete:
/// content passes through (except a possible start of `<tool_call>`), a complete call comes
/// out whole.
#[derive(Debug, Default)]
pub struct CallStream {
    held: String,
    /// Calls sent so far (their `index` in the deltas).
    pub sent: usize,
}

impl CallStream {
    /// Feeds `text`; returns the content to send now and the calls completed.
    pub fn push(&mut self, text: &str, tools: &Tools) -> (String, Vec<ToolCall>) {
        self.held.push_str(text);
        let mut content = String::new();
        let mut calls = Vec::new();
        loop {
            if let Some(start) = self.held.find(OPEN) {
                content.push_str(&self.held[..start]);
                let after = &self.held[start + OPEN.len()..];
                let Some(end) = after.find(CLOSE) else {
                    self.held.drain(..start);
                    break;
                };
                let body = after[..end].to_string();
                let whole = start + OPEN.len() + end + CLOSE.len();
                match call_of(&body, tools) {
                    Some(c) => calls.push(c),
                    None => content.push_str(&self.held[start..whole]),
                }
                self.held.drain(..whole);
            } else {
                // Keep a tail that could still become `<tool_call>`.
                let keep = (1..OPEN.len())
                    .rev()
                    .find(|&k| self.held.ends_with(&OPEN[..k]))
                    .unwrap_or(0);
                let cut = self.held.len() - keep;
                content.push_str(&self.held[..cut]);
                self.held.drain(..cut);
                break;
            }
        }
        self.sent += calls.len();
        (content, calls)
    }

    /// The end of the choice: whatever is held is content.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(choice: Value, parallel: Option<bool>) -> Result<Option<Tools>, ApiError> {
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
    fn calls_split_from_text_and_streams() {
        let t = tools(json!("auto"), None).unwrap().unwrap();
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"unknown\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = split(text, &t);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Paris"}"#);
        assert!(content.starts_with("Let me check.") && content.contains("unknown"));
        // The same text in small pieces: the same content and calls, nothing of a call leaks.
        let mut s = CallStream::default();
        let (mut c2, mut calls2) = (String::new(), Vec::new());
        for piece in text.as_bytes().chunks(3) {
            let (c, k) = s.push(std::str::from_utf8(piece).unwrap(), &t);
            assert!(!c.contains("get_weather"), "{c}");
            c2.push_str(&c);
            calls2.extend(k);
        }
        c2.push_str(&s.finish());
        assert_eq!(calls2.len(), 1);
        assert_eq!(calls2[0].function, calls[0].function);
        assert_eq!(c2.trim(), content);
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
