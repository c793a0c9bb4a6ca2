//! OpenAI wire types for `/v1/chat/completions`, `/v1/completions` and `/v1/models`, with
//! vLLM's extra sampling fields (`top_k`, `min_p`, `min_tokens`, `ignore_eos`,
//! `stop_token_ids`, `structured_outputs`). Unknown fields are ignored, as vLLM does; known
//! OpenAI fields that would change the output and are not implemented are refused
//! (`structured`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    /// -1 or 0: disabled.
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<f32>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    pub seed: Option<i64>,
    /// Choices to generate (at most 16; prompts × n at most 64).
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u32>,
    /// Up to 16 strings of up to 256 bytes; the output ends before the first found.
    pub stop: Option<StopSpec>,
    #[schema(max_items = 64)]
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": …}}`.
    pub response_format: Option<serde_json::Value>,
    /// vLLM's `{"json" | "regex" | "choice" | "grammar": …}`.
    pub structured_outputs: Option<serde_json::Value>,
    /// Token id (a string) → bias in [-100, 100].
    #[schema(value_type = Option<std::collections::HashMap<String, f32>>)]
    pub logit_bias: Option<serde_json::Value>,
    /// Functions the model may call (`tools`), and how (`tool_choice`, `parallel_tool_calls`).
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<bool>,
    // OpenAI fields that would change the output and are refused (`structured::refuse_unsupported`).
    pub functions: Option<serde_json::Value>,
    pub function_call: Option<serde_json::Value>,
    pub prediction: Option<serde_json::Value>,
    pub audio: Option<serde_json::Value>,
    pub modalities: Option<serde_json::Value>,
    pub web_search_options: Option<serde_json::Value>,
}

/// A chat message's content: text, or a list of parts of which Tandem reads the text ones.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    /// Only `text` parts are read; others are refused.
    #[serde(rename = "type")]
    #[schema(value_type = PartKind)]
    pub kind: String,
    pub text: Option<String>,
}

/// The content part types Tandem reads (the document's enum for `type`).
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum PartKind {
    Text,
}

/// A message's author (the document's enum for `role`; the handlers check it).
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    #[schema(value_type = Role)]
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// An assistant message's calls (OpenAI's form).
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `role: tool` message's call.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessageIn>,
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[schema(maximum = 20)]
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptSpec,
    pub max_tokens: Option<u32>,
    #[schema(maximum = 20)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

// ---- chat responses ----

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatMessageOut {
    pub role: &'static str,
    /// `null` when the answer is only tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// A tool call the model made (`crate::tools` finds them).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments object as JSON text (OpenAI's form).
    pub arguments: String,
}

#[derive(Debug, Serialize, Default, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize, Default, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A tool call in a stream, as OpenAI sends it: the first delta of a call carries its `id`,
/// `type` and function `name` (with `arguments: ""`), the next ones fragments of `arguments`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The next piece of the arguments' JSON text.
    pub arguments: String,
}

/// One server-sent event of a streamed response, as a client parses it: `data` is a chunk's JSON
/// (`ChatCompletionChunk`, or a `CompletionResponse` with one choice), an error envelope, or
/// `[DONE]` at the end.
#[derive(Debug, Serialize, ToSchema)]
pub struct SseEvent {
    pub data: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

// ---- completion responses ----

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The legacy completions logprobs format.
#[derive(Debug, Serialize, Default, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
    pub text_offset: Vec<usize>,
}

// ---- models ----

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}
