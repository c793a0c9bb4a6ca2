//! Tool calls out of generated text: [`CallStream`] as the text streams (OpenAI's deltas: a
//! call's head, then its arguments in fragments), [`split`] over a whole text. A call is a
//! `<tool_call>` block whose JSON names one of the request's tools.

use super::{CLOSE, OPEN, Tools};
use crate::protocol::{FunctionCall, FunctionDelta, ToolCall, ToolCallDelta};
use serde_json::Value;

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

/// The call a stream has open: `None` until its head went out, then the call as far as it
/// came and where its arguments are read.
type OpenCall = Option<(ToolCall, ArgScan)>;

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
                    self.open = Some(None);
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
            if open.is_none()
                && let Some((name, at)) = header(body)
                && tools.tools.iter().any(|t| t.name == name)
            {
                let c = call(name, String::new());
                deltas.push(head(self.sent, &c));
                *open = Some((c, ArgScan::at(at)));
            }
            if let Some((c, scan)) = open {
                let mut frag = String::new();
                scan.feed(body, &mut frag);
                if !frag.is_empty() {
                    c.function.arguments.push_str(&frag);
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
            match (open.take(), call_of(body, tools)) {
                (Some((c, _)), Some(_)) => {
                    self.calls.push(c);
                    self.sent += 1;
                }
                (Some(_), None) => {
                    self.broken.push_str(&block);
                    self.sent += 1;
                }
                (None, Some((name, args))) => {
                    // A block whose head completed only at its close (`name` after
                    // `arguments`, or no `arguments`): the whole call at once.
                    let c = call(name, args);
                    deltas.push(head(self.sent, &c));
                    self.calls.push(c);
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
            Some(Some((c, _))) => {
                // Cut off (max_tokens): OpenAI too returns the call as far as it came.
                self.calls.push(c);
                String::new()
            }
            Some(None) => format!("{OPEN}{held}"),
            None => held,
        }
    }
}

/// A call's first delta: its index, id, type, name and the arguments so far.
fn head(index: usize, c: &ToolCall) -> ToolCallDelta {
    ToolCallDelta {
        index,
        id: Some(c.id.clone()),
        kind: Some(c.kind),
        function: FunctionDelta {
            name: Some(c.function.name.clone()),
            arguments: c.function.arguments.clone(),
        },
    }
}

/// A new call, with an id of its own.
fn call(name: String, arguments: String) -> ToolCall {
    ToolCall {
        id: format!("call_{}", uuid::Uuid::new_v4().simple()),
        kind: "function",
        function: FunctionCall { name, arguments },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::tests::tools;
    use serde_json::json;

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
}
