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

use crate::error::ApiError;
use crate::protocol::{FunctionCall, FunctionDelta, SamplingFields, ToolCall, ToolCallDelta};
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

/// Splits generated text into its content and the calls it makes (blocks that parse as
/// `{"name": …, "arguments": {…}}` naming one of `tools`; anything else stays content). The
/// calls are those a [`CallStream`] streams over the same text, whole.
pub fn split(text: &str, tools: &Tools) -> (String, Vec<ToolCall>) {
    let mut s = CallStream::default();
    let (mut content, _) = s.push(text, tools);
    content.push_str(&s.finish());
    content.push_str(&s.broken);
    if !s.calls.is_empty() {
        content = content.trim().to_string();
    }
    (content, s.calls)
}

/// A block's call: the function's name and its arguments as compact JSON text (the model's
/// own key order), when the block is a call of one of `tools`.
fn call_of(body: &str, tools: &Tools) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?;
    if !tools.tools.iter().any(|t| t.name == name) {
        return None;
    }
    let args = match v.get("arguments") {
        None => "{}".to_string(),
        Some(a) if a.is_object() => {
            let (_, start) = header(body)?;
            let mut scan = ArgScan::at(start);
            let mut out = String::new();
            scan.feed(body, &mut out);
            out
        }
        Some(_) => return None,
    };
    Some((name.to_string(), args))
}

/// Skips JSON whitespace from `i`.
fn ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\n' | b'\r' | b'\t') {
        i += 1;
    }
    i
}

/// The end (exclusive) of the JSON string starting at `i` (a `"`), if it is complete.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut k = i + 1;
    while k < b.len() {
        match b[k] {
            b'\\' => k += 2,
            b'"' => return Some(k + 1),
            _ => k += 1,
        }
    }
    None
}

/// Reads a call block's head as far as it has come: the function's name and where the
/// `arguments` value starts, once both have been written (`{"name": …, "arguments": …}` in
/// either order, other keys skipped).
fn header(body: &str) -> Option<(String, usize)> {
    let b = body.as_bytes();
    let mut i = ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    let (mut name, mut args): (Option<String>, Option<usize>) = (None, None);
    loop {
        i = ws(b, i + 1);
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let end = string_end(b, i)?;
        let key: String = serde_json::from_str(&body[i..end]).ok()?;
        i = ws(b, end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = ws(b, i + 1);
        if i >= b.len() {
            return None;
        }
        if key == "arguments" {
            args = Some(i);
        }
        if let (Some(n), Some(a)) = (&name, args) {
            return Some((n.clone(), a));
        }
        // Past this value: a complete string (the name), else any complete value.
        if key == "name" {
            let end = string_end(b, i).filter(|_| b[i] == b'"')?;
            name = Some(serde_json::from_str::<String>(&body[i..end]).ok()?);
            i = end;
            if let (Some(n), Some(a)) = (&name, args) {
                return Some((n.clone(), a));
            }
        } else {
            let mut scan = ArgScan::at(i);
            scan.feed(body, &mut String::new());
            if !scan.done {
                return None;
            }
            i = scan.pos;
        }
        i = ws(b, i);
        if b.get(i) != Some(&b',') {
            return None;
        }
    }
}

/// Reads one JSON value as it is written, passing it on without the whitespace between its
/// tokens: the `arguments` text of a streamed call, fragment by fragment.
#[derive(Debug, Clone)]
struct ArgScan {
    /// Next byte of the block to read.
    pos: usize,
    depth: usize,
    started: bool,
    in_str: bool,
    escaped: bool,
    done: bool,
}

impl ArgScan {
    fn at(pos: usize) -> ArgScan {
        ArgScan {
            pos,
            depth: 0,
            started: false,
            in_str: false,
            escaped: false,
            done: false,
        }
    }

    /// Reads `body` from where it stopped; appends what it read, compacted, to `out`. `pos`
    /// ends just past the value (or at the character that ended a top-level scalar).
    fn feed(&mut self, body: &str, out: &mut String) {
        let start = self.pos;
        for (k, ch) in body[start..].char_indices() {
            if self.done {
                return;
            }
            let at = start + k;
            self.pos = at + ch.len_utf8();
            if self.in_str {
                out.push(ch);
                if self.escaped {
                    self.escaped = false;
                } else if ch == '\\' {
                    self.escaped = true;
                } else if ch == '"' {
                    self.in_str = false;
                    self.done = self.depth == 0;
                }
                continue;
            }
            match ch {
                ' ' | '\n' | '\r' | '\t' => {
                    if self.started && self.depth == 0 {
                        // A top-level scalar ends at whitespace.
                        self.done = true;
                        self.pos = at;
                    }
                }
                '"' => {
                    self.in_str = true;
                    self.started = true;
                    out.push(ch);
                }
                '{' | '[' => {
                    self.depth += 1;
                    self.started = true;
                    out.push(ch);
                }
                '}' | ']' | ',' if self.depth == 0 => {
                    // Not part of the value: the end of a top-level scalar, or no value.
                    self.done = true;
                    self.pos = at;
                }
                '}' | ']' => {
                    self.depth -= 1;
                    out.push(ch);
                    self.done = self.depth == 0;
                }
                _ => {
                    self.started = true;
                    out.push(ch);
                }
            }
        }
    }
}

/// The call a stream has open.
#[derive(Debug)]
struct OpenCall {
    /// Set once the head went out (the call's index, id and name).
    scan: Option<ArgScan>,
}

/// Streams a choice's text with the calls in it taken out, as OpenAI streams them: content
/// passes through (except a possible start of `<tool_call>`); once a call's function name and
/// the start of its arguments are written, a delta with the call's `index`, `id`, `type` and
/// `name` goes out, then the arguments in fragments as they come (compact JSON, the model's
/// key order). Text in `<tool_call>` tags that does not name a tool is content. A call whose
/// arguments turn out not to be a JSON object when its block closes has been streamed
/// already; [`split`] (non-streaming) returns such a block as content.
#[derive(Debug, Default)]
pub struct CallStream {
    held: String,
    open: Option<OpenCall>,
    /// Calls begun so far (the next call's `index`).
    pub sent: usize,
    /// The calls closed whole and valid.
    pub calls: Vec<ToolCall>,
    /// Blocks streamed as calls that did not close as valid ones, as text.
    pub broken: String,
    /// The open call's id and arguments so far.
    current: Option<(String, String, String)>,
}

impl CallStream {
    /// Feeds `text`; returns the content to send now and the call deltas.
    pub fn push(&mut self, text: &str, tools: &Tools) -> (String, Vec<ToolCallDelta>) {
        self.held.push_str(text);
        let mut content = String::new();
        let mut deltas = Vec::new();
        loop {
            let Some(open) = &mut self.open else {
                if let Some(start) = self.held.find(OPEN) {
                    content.push_str(&self.held[..start]);
                    self.held.drain(..start + OPEN.len());
                    self.open = Some(OpenCall { scan: None });
                    continue;
                }
                // Keep a tail that could still become `<tool_call>`.
                let keep = (1..OPEN.len())
                    .rev()
                    .find(|&k| self.held.ends_with(&OPEN[..k]))
                    .unwrap_or(0);
                let cut = self.held.len() - keep;
                content.push_str(&self.held[..cut]);
                self.held.drain(..cut);
                break;
            };
            let end = self.held.find(CLOSE);
            let body = &self.held[..end.unwrap_or(self.held.len())];
            if open.scan.is_none()
                && let Some((name, at)) = header(body)
                && tools.tools.iter().any(|t| t.name == name)
            {
                let id = format!("call_{}", uuid::Uuid::new_v4().simple());
                deltas.push(ToolCallDelta {
                    index: self.sent,
                    id: Some(id.clone()),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(name.clone()),
                        arguments: String::new(),
                    },
                });
                self.current = Some((id, name, String::new()));
                open.scan = Some(ArgScan::at(at));
            }
            if let Some(scan) = &mut open.scan {
                let mut frag = String::new();
                scan.feed(body, &mut frag);
                if !frag.is_empty() {
                    if let Some(c) = &mut self.current {
                        c.2.push_str(&frag);
                    }
                    deltas.push(ToolCallDelta {
                        index: self.sent,
                        id: None,
                        kind: None,
                        function: FunctionDelta {
                            name: None,
                            arguments: frag,
                        },
                    });
                }
            }
            let Some(end) = end else { break };
            let block = format!("{OPEN}{body}{CLOSE}");
            let valid = call_of(body, tools);
            match (self.current.take(), valid) {
                (Some((id, name, args)), Some(_)) => {
                    self.calls.push(call(id, name, args));
                    self.sent += 1;
                }
                (Some(_), None) => {
                    self.broken.push_str(&block);
                    self.sent += 1;
                }
                (None, Some((name, args))) => {
                    // A block whose head completed only at its close (`name` after
                    // `arguments`, or no `arguments`): the whole call at once.
                    let id = format!("call_{}", uuid::Uuid::new_v4().simple());
                    deltas.push(ToolCallDelta {
                        index: self.sent,
                        id: Some(id.clone()),
                        kind: Some("function"),
                        function: FunctionDelta {
                            name: Some(name.clone()),
                            arguments: args.clone(),
                        },
                    });
                    self.calls.push(call(id, name, args));
                    self.sent += 1;
                }
                (None, None) => content.push_str(&block),
            }
            self.held.drain(..end + CLOSE.len());
            self.open = None;
        }
        (content, deltas)
    }

    /// The end of the choice: whatever is held is content (an unclosed call's block too).
    pub fn finish(&mut self) -> String {
        let held = std::mem::take(&mut self.held);
        match self.open.take() {
            Some(_) => {
                if let Some((id, name, args)) = self.current.take() {
                    // Cut off (max_tokens): OpenAI too returns the call as far as it came.
                    self.calls.push(call(id, name, args));
                    return String::new();
                }
                format!("{OPEN}{held}")
            }
            None => held,
        }
    }
}

fn call(id: String, name: String, arguments: String) -> ToolCall {
    ToolCall {
        id,
        kind: "function",
        function: FunctionCall { name, arguments },
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

    /// Streams `text` in pieces of `size` bytes; returns the content and the calls rebuilt
    /// from the deltas, checking each delta's shape on the way.
    fn stream(text: &str, t: &Tools, size: usize) -> (String, Vec<(String, String, String)>) {
        let mut s = CallStream::default();
        let (mut content, mut calls) = (String::new(), Vec::<(String, String, String)>::new());
        let absorb = |deltas: Vec<ToolCallDelta>, calls: &mut Vec<(String, String, String)>| {
            for d in deltas {
                if let Some(id) = d.id {
                    assert_eq!(d.index, calls.len(), "a new call takes the next index");
                    assert_eq!(d.kind, Some("function"));
                    calls.push((id, d.function.name.unwrap(), d.function.arguments));
                } else {
                    assert!(d.function.name.is_none() && d.kind.is_none());
                    assert_eq!(d.index + 1, calls.len(), "fragments continue the open call");
                    calls[d.index].2.push_str(&d.function.arguments);
                }
            }
        };
        let mut at = 0;
        while at < text.len() {
            let mut end = (at + size).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            let (c, d) = s.push(&text[at..end], t);
            assert!(!c.contains("get_weather"), "{c}");
            content.push_str(&c);
            absorb(d, &mut calls);
            at = end;
        }
        content.push_str(&s.finish());
        (content, calls)
    }

    #[test]
    fn calls_split_from_text_and_stream_in_fragments() {
        let t = tools(json!("auto"), None).unwrap().unwrap();
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris \\\"é\\\" [1]\", \"days\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"name\": \"unknown\", \"arguments\": {}}\n</tool_call>\n<tool_call>{\"arguments\": {\"b\": 2, \"a\": 1}, \"name\": \"add\"}</tool_call>";
        let (content, calls) = split(text, &t);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(
            calls[0].function.arguments, r#"{"city":"Paris \"é\" [1]","days":[1,2]}"#,
            "compact, the model's key order"
        );
        assert_eq!(calls[1].function.name, "add");
        assert_eq!(calls[1].function.arguments, r#"{"b":2,"a":1}"#);
        assert!(content.starts_with("Let me check.") && content.contains("unknown"));
        // The same text in pieces of every size: the same content and calls, in fragments.
        for size in [1, 2, 3, 7, 64] {
            let (c2, calls2) = stream(text, &t, size);
            assert_eq!(c2.trim(), content, "pieces of {size}");
            let got: Vec<(&str, &str)> = calls2
                .iter()
                .map(|c| (c.1.as_str(), c.2.as_str()))
                .collect();
            let want: Vec<(&str, &str)> = calls
                .iter()
                .map(|c| (c.function.name.as_str(), c.function.arguments.as_str()))
                .collect();
            assert_eq!(got, want, "pieces of {size}");
        }
        // Arguments arrive in several fragments when the text does.
        let mut s = CallStream::default();
        let (_, d1) = s.push(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci",
            &t,
        );
        let (_, d2) = s.push("ty\": \"Rome\"}}\n</tool_call>", &t);
        assert_eq!(d1.len(), 2, "{d1:?}");
        assert_eq!(d1[0].function.arguments, "");
        assert_eq!(d1[1].function.arguments, "{\"ci");
        assert_eq!(d2.len(), 1);
        assert_eq!(d2[0].function.arguments, "ty\":\"Rome\"}");
        assert_eq!(s.calls.len(), 1);
        // A call cut off mid-arguments is returned as far as it came, as OpenAI does.
        let mut s = CallStream::default();
        s.push(
            "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1",
            &t,
        );
        assert_eq!(s.finish(), "");
        assert_eq!(s.calls[0].function.arguments, "{\"a\":1");
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
