//! The official-shaped Rust client (`async-openai`) works against Tandem unchanged.

mod common;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use futures::StreamExt;

fn client(url: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{url}/v1"))
            .with_api_key("unused"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_streaming_and_not() {
    let srv = common::tiny().await;
    let c = client(&srv.url);

    let models = c.models().list().await.unwrap();
    assert_eq!(models.data[0].id, "tiny");

    let req = CreateChatCompletionRequestArgs::default()
        .model("tiny")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("the thin theory")
            .build()
            .unwrap()
            .into()])
        .max_completion_tokens(12u32)
        .seed(3)
        .build()
        .unwrap();
    let resp = c.chat().create(req.clone()).await.unwrap();
    let text = resp.choices[0].message.content.clone().unwrap();
    let usage = resp.usage.unwrap();
    assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 12);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );

    // Streaming the same seeded request yields the same text.
    let mut s = c.chat().create_stream(req).await.unwrap();
    let mut streamed = String::new();
    let mut finish = None;
    while let Some(chunk) = s.next().await {
        let chunk = chunk.unwrap();
        for ch in chunk.choices {
            streamed.push_str(ch.delta.content.as_deref().unwrap_or(""));
            if ch.finish_reason.is_some() {
                finish = ch.finish_reason;
            }
        }
    }
    assert_eq!(streamed, text);
    assert!(finish.is_some());

    let req = CreateCompletionRequestArgs::default()
        .model("tiny")
        .prompt("in the er")
        .max_tokens(9u32)
        .seed(5)
        .build()
        .unwrap();
    let resp = c.completions().create(req.clone()).await.unwrap();
    assert_eq!(
        resp.usage.as_ref().unwrap().completion_tokens,
        9,
        "tiny model has no EOS pull: 9 tokens"
    );
    let mut s = c.completions().create_stream(req).await.unwrap();
    let mut streamed = String::new();
    while let Some(chunk) = s.next().await {
        for ch in chunk.unwrap().choices {
            streamed.push_str(&ch.text);
        }
    }
    assert_eq!(streamed, resp.choices[0].text);
}
