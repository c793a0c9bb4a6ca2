//! `GET /openapi.json`: the OpenAPI 3.1 document of every route and field, generated from the
//! wire types (`protocol`, `routes::tokenize`, `error`) and the handlers' `#[utoipa::path]`s,
//! so it cannot drift from the code. CI fuzzes a running server against it (schemathesis).

use crate::AppState;
use crate::error::ErrorBody;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::OnceLock;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tandem",
        description = "OpenAI-compatible API of a Tandem cluster, with vLLM's extra fields."
    ),
    paths(
        crate::routes::chat::handler,
        crate::routes::completions::handler,
        crate::routes::models::list,
        crate::routes::models::get,
        crate::routes::tokenize::tokenize,
        crate::routes::tokenize::detokenize,
        crate::routes::models::live,
        crate::routes::models::health,
        crate::routes::models::metrics,
        document,
    ),
    components(schemas(ErrorBody, crate::protocol::ChatCompletionChunk)),
    modifiers(&BearerKey)
)]
struct ApiDoc;

/// `--api-key`: a bearer token.
struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "api_key",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

/// The document as JSON text for a server of `model`: `model` in the request bodies is that
/// id (any other is a 404). The generated part is built once per process.
pub fn json(model: &str) -> String {
    static DOC: OnceLock<serde_json::Value> = OnceLock::new();
    let mut doc = DOC
        .get_or_init(|| {
            let mut doc = ApiDoc::openapi();
            doc.info.version = env!("CARGO_PKG_VERSION").to_string();
            serde_json::to_value(&doc).expect("the document serializes")
        })
        .clone();
    let schemas = &mut doc["components"]["schemas"];
    for name in [
        "ChatCompletionRequest",
        "CompletionRequest",
        "TokenizeRequest",
        "DetokenizeRequest",
    ] {
        name_the_model(&mut schemas[name], model);
    }
    doc.to_string()
}

/// Sets `enum: [model]` on the `model` property of `schema` (or of the `allOf` part that has
/// it: a flattened struct).
fn name_the_model(schema: &mut serde_json::Value, model: &str) {
    if let Some(field) = schema.pointer_mut("/properties/model") {
        field["enum"] = serde_json::json!([model]);
    }
    if let Some(parts) = schema.get_mut("allOf").and_then(|a| a.as_array_mut()) {
        parts.iter_mut().for_each(|p| name_the_model(p, model));
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API",
        content_type = "application/json", body = Object)))]
pub async fn document(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        json(st.model_id()),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Every `$ref` in `v`.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn the_document_describes_every_route_and_resolves() {
        let doc: Value = serde_json::from_str(&super::json("tiny")).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        for (path, method) in [
            ("/v1/chat/completions", "post"),
            ("/v1/completions", "post"),
            ("/v1/models", "get"),
            ("/v1/models/{id}", "get"),
            ("/tokenize", "post"),
            ("/detokenize", "post"),
            ("/live", "get"),
            ("/health", "get"),
            ("/metrics", "get"),
            ("/openapi.json", "get"),
        ] {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        }
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 20);
        for r in all {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            assert!(doc["components"]["schemas"][name].is_object(), "{r}");
        }
        // The request fields people look for, with their ranges.
        let req = &doc["components"]["schemas"]["ChatCompletionRequest"];
        assert_eq!(
            req.pointer("/allOf/1/properties/model/enum"),
            Some(&serde_json::json!(["tiny"])),
            "{req}"
        );
        // Each server's document names its own model.
        let other: Value = serde_json::from_str(&super::json("other")).unwrap();
        let req = &other["components"]["schemas"]["ChatCompletionRequest"];
        assert_eq!(
            req.pointer("/allOf/1/properties/model/enum"),
            Some(&serde_json::json!(["other"]))
        );
        let s = &doc["components"]["schemas"]["SamplingFields"]["properties"];
        assert_eq!(s["temperature"]["maximum"], 2.0);
        for f in [
            "response_format",
            "structured_outputs",
            "tools",
            "tool_choice",
            "logit_bias",
        ] {
            assert!(s[f].is_object(), "{f}");
        }
        let chat = &doc["paths"]["/v1/chat/completions"]["post"]["responses"];
        for code in ["200", "400", "401", "404", "413", "503"] {
            assert!(chat[code].is_object(), "{code}");
        }
        assert!(chat["200"]["content"]["text/event-stream"].is_object());
    }
}
