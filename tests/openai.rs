//! OpenAI-style routing by the body's `model` field, with the real binary and simulated
//! predictors (whose echo endpoint returns the SHA-256 of the body it received).

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

fn config() -> String {
    let service = |name: &str, model: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nmodels = [\"{model}\"]\nreadiness_path = \"/ready\"\n{}\n",
            predictor_process(&["--load-ms", "300"])
        )
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\n\n\
         [openai]\nhosts = [\"llm.local\"]\n\n{}{}",
        service("llama", "llama-3-8b"),
        service("mistral", "mistral-7b")
    )
}

fn chat_body(model: &str, padding: usize) -> String {
    // The model comes after a long message, as some clients serialise it.
    let content = "x".repeat(padding);
    serde_json::json!({ "messages": [{ "role": "user", "content": content }], "model": model, "stream": false }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_route_by_model_with_bodies_intact() {
    let coldgate = Coldgate::start(&config());

    let (status, body) = get(coldgate.data, "llm.local", "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["llama-3-8b", "mistral-7b"]);
    assert_eq!(list["object"], "list");

    // From zero, with the model field 40 KiB into the body.
    let body = chat_body("mistral-7b", 40 * 1024);
    let response = send(coldgate.data, request("POST", "llm.local", "/v1/chat/completions", body.clone())).await;
    assert_eq!(response.status(), StatusCode::OK, "{:?}", response.body());
    let echo: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(echo["sha256"], sha256_hex(body.as_bytes()), "the body must reach the instance intact");
    assert_eq!(coldgate.service_status("mistral").await["state"], "serving");
    assert_eq!(coldgate.service_status("llama").await["state"], "idle", "only the requested model may start");

    // A small body to the other model.
    let body = r#"{"model":"llama-3-8b","input":"hello"}"#;
    let response = send(coldgate.data, request("POST", "llm.local", "/v1/embeddings", body)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let echo: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(echo["sha256"], sha256_hex(body.as_bytes()));
    coldgate.wait_for_service("llama", Duration::from_secs(5), |s| s["state"] == "serving").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_missing_models_get_openai_errors() {
    let coldgate = Coldgate::start(&config());

    let response = send(coldgate.data, request("POST", "llm.local", "/v1/chat/completions", chat_body("gpt-9", 10))).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let error: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert_eq!(error["error"]["param"], "model");

    let response = send(coldgate.data, request("POST", "llm.local", "/v1/completions", r#"{"prompt":"hi"}"#)).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(error["error"]["code"], "missing_model");

    // The model field beyond the 64 KiB prefix limit.
    let response = send(coldgate.data, request("POST", "llm.local", "/v1/chat/completions", chat_body("llama-3-8b", 80 * 1024))).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(error["error"]["code"], "model_not_found_in_prefix");

    for name in ["llama", "mistral"] {
        assert_eq!(coldgate.service_status(name).await["state"], "idle", "a rejected request started {name}");
    }
}
