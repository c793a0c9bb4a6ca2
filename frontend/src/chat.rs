//! The chat template a GGUF carries (`tokenizer.chat_template`), rendered with minijinja the
//! way Hugging Face's `apply_chat_template` does (trim/lstrip blocks, Python string methods).

use crate::error::{ModelError, Result};
use serde::Serialize;

/// One chat message after the API layer flattened its content to text.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's calls, for a template that renders them itself
    /// ([`ChatTemplate::renders_tools`]): OpenAI's form with each `function.arguments` an
    /// object, as Hugging Face templates read them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `role: tool` message's call id, for such a template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    renders_tools: bool,
}

/// What opens a tool call in the Hermes convention.
pub const TOOL_CALL_TAG: &str = "<tool_call>";

/// ChatML, used when a model ships no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn tmpl_err(e: minijinja::Error) -> ModelError {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    ModelError::Template(msg)
}

/// Python's `json.dumps` separators (`", "`, `": "`), as Hugging Face's `tojson` writes.
struct PySeparators;

impl serde_json::ser::Formatter for PySeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// The `tojson` filter as Hugging Face's templates expect it (`json.dumps(x,
/// ensure_ascii=False, indent=indent)`), not minijinja's HTML-safe one, which would escape
/// `<`, `>`, `&` and `'` in tool descriptions and arguments.
fn tojson(
    v: minijinja::Value,
    indent: Option<usize>,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let err = |e: serde_json::Error| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    };
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let f = serde_json::ser::PrettyFormatter::with_indent(&pad);
            serde::Serialize::serialize(
                &v,
                &mut serde_json::Serializer::with_formatter(&mut out, f),
            )
            .map_err(err)?;
        }
        None => serde::Serialize::serialize(
            &v,
            &mut serde_json::Serializer::with_formatter(&mut out, PySeparators),
        )
        .map_err(err)?,
    }
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    Ok(minijinja::Value::from_safe_string(text))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(tmpl_err)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_function("strftime_now", |fmt: String| -> String {
            // Deterministic output matters more than the wall clock for a template's date line.
            fmt.replace("%d", "01")
                .replace("%b", "Jan")
                .replace("%B", "January")
                .replace("%Y", "2026")
                .replace("%m", "01")
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(tmpl_err)?;
        let reads_tools = env
            .get_template("chat")
            .map_err(tmpl_err)?
            .undeclared_variables(false)
            .contains("tools");
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
            renders_tools: reads_tools && source.contains(TOOL_CALL_TAG),
        })
    }

    /// Whether the template has tool syntax of the Hermes form Tandem parses: it reads `tools`
    /// (rendering their descriptions itself), and its calls are `<tool_call>` blocks (Qwen2.5,
    /// Qwen3, Hermes 2/3, SmolLM3 and others). Such a template is given the tools, the
    /// assistant messages' `tool_calls` and the `role: tool` messages as they are; for any
    /// other the API layer describes the tools in the system prompt itself.
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// [`render`](Self::render), giving the template `tools` (OpenAI's list of
    /// `{"type": "function", "function": {…}}`).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self.env.get_template("chat").map_err(tmpl_err)?;
        let mut ctx = std::collections::BTreeMap::new();
        ctx.insert(
            "messages",
            minijinja::Value::from(minijinja::value::Serde(messages)),
        );
        ctx.insert(
            "add_generation_prompt",
            minijinja::Value::from(add_generation_prompt),
        );
        ctx.insert("bos_token", minijinja::Value::from(self.bos_token.as_str()));
        ctx.insert("eos_token", minijinja::Value::from(self.eos_token.as_str()));
        if let Some(tools) = tools {
            ctx.insert(
                "tools",
                minijinja::Value::from(minijinja::value::Serde(tools)),
            );
        }
        t.render(ctx).map_err(tmpl_err)
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_and_errors_surface() {
        let t = ChatTemplate::new(CHATML, String::new(), "<|im_end|>".into()).unwrap();
        let m = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let bad = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}",
            String::new(),
            String::new(),
        )
        .unwrap();
        let e = bad.render(&m, true).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
        assert!(ChatTemplate::new("{% for %}", String::new(), String::new()).is_err());
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            "{{ messages[0]['content'].strip().upper() }}",
            String::new(),
            String::new(),
        )
        .unwrap();
        let m = vec![ChatMessage::new("user", "  hi  ")];
        assert_eq!(t.render(&m, false).unwrap(), "HI");
    }

    /// Qwen2.5's template (tools and calls in the Hermes form), abridged to what it does with
    /// tools.
    const QWEN_TOOLS: &str = include_str!("../testdata/qwen2.5-tools.jinja");

    #[test]
    fn a_template_with_tool_syntax_renders_tools_calls_and_results_itself() {
        let t = ChatTemplate::new(QWEN_TOOLS, String::new(), "<|im_end|>".into()).unwrap();
        assert!(t.renders_tools());
        assert!(
            !ChatTemplate::new(CHATML, String::new(), String::new())
                .unwrap()
                .renders_tools()
        );
        let tools = serde_json::json!([{"type": "function", "function": {"name": "add",
            "description": "a < b & c", "parameters": {"type": "object"}}}]);
        let m = vec![
            ChatMessage::new("user", "1+2?"),
            ChatMessage {
                tool_calls: Some(serde_json::json!([{"id": "call_1", "type": "function",
                    "function": {"name": "add", "arguments": {"a": 1, "b": "é"}}}])),
                ..ChatMessage::new("assistant", "")
            },
            ChatMessage {
                tool_call_id: Some("call_1".into()),
                ..ChatMessage::new("tool", "3")
            },
        ];
        let text = t.render_with_tools(&m, Some(&tools), true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n<tools>\n\
             {\"function\": {\"description\": \"a < b & c\", \"name\": \"add\", \"parameters\": {\"type\": \"object\"}}, \"type\": \"function\"}\n\
             </tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
             <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n\
             <|im_start|>user\n1+2?<|im_end|>\n\
             <|im_start|>assistant\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": \"é\"}}\n</tool_call><|im_end|>\n\
             <|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // Without tools the template renders as before.
        let plain = t.render(&m[..1], true).unwrap();
        assert_eq!(
            plain,
            "<|im_start|>user\n1+2?<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
