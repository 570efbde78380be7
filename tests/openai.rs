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

    // The model field beyond the default 1 MiB prefix limit.
    let response = send(coldgate.data, request("POST", "llm.local", "/v1/chat/completions", chat_body("llama-3-8b", 1024 * 1024))).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(error["error"]["code"], "model_not_found_in_prefix");
    // The head and the scanned bytes together stay under 1 MiB.
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("first 10485") || message.contains("first 10484"), "{error}");

    // HTTP/2 requests are scanned through pingora's 64 KiB replay buffer.
    let stream = tokio::net::TcpStream::connect(coldgate.data).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let h2_request = |body: String| {
        http::Request::post("http://llm.local/v1/chat/completions")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    };
    // Just past the buffer (the model field arrives in the chunk that overflows it), well
    // past it, and a body larger than the client's flow-control window.
    for padding in [66_000, 80 * 1024, 400_000] {
        let sent = sender.send_request(h2_request(chat_body("llama-3-8b", padding)));
        let response = tokio::time::timeout(Duration::from_secs(10), sent)
            .await
            .unwrap_or_else(|_| panic!("no answer within 10 s for {padding} bytes before the model"))
            .unwrap_or_else(|e| panic!("HTTP/2 request with {padding} bytes before the model failed: {e}"));
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{padding} bytes before the model");
        let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"]["code"], "model_not_found_in_prefix");
        assert!(error["error"]["message"].as_str().unwrap().contains("HTTP/2"), "{error}");
    }

    for name in ["llama", "mistral"] {
        assert_eq!(coldgate.service_status(name).await["state"], "idle", "a rejected request started {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_prefixes_route_on_one_keep_alive_connection() {
    let coldgate = Coldgate::start(&config());
    let stream = tokio::net::TcpStream::connect(coldgate.data).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);

    // Each model is cold when its request arrives, and the model field sits deep in the
    // body; all requests share one connection, as HTTP client pools send them.
    for (model, service, padding) in [("mistral-7b", "mistral", 900 * 1024), ("llama-3-8b", "llama", 700 * 1024), ("mistral-7b", "mistral", 100)] {
        let body = chat_body(model, padding);
        sender.ready().await.expect("the connection stays open between requests");
        let response = sender.send_request(request("POST", "llm.local", "/v1/chat/completions", body.clone())).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "model {model} with {padding} bytes before it");
        let received = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        let echo: serde_json::Value = serde_json::from_slice(&received).unwrap();
        assert_eq!(echo["sha256"], sha256_hex(body.as_bytes()), "the body must reach {service} intact");
        assert_eq!(coldgate.service_status(service).await["state"], "serving");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_gets_one_interim_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let coldgate = Coldgate::start(&config());
    let body = chat_body("llama-3-8b", 200 * 1024);
    let mut stream = tokio::net::TcpStream::connect(coldgate.data).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: llm.local\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut interim)).await.expect("100 Continue in time").unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response)).await.expect("response in time").unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "one interim response, then the final one: {}", &text[..text.len().min(300)]);
    let json_start = text.find("\r\n\r\n").unwrap() + 4;
    let echo: serde_json::Value = serde_json::from_str(text[json_start..].trim()).unwrap_or_else(|e| panic!("{e}: {}", &text[json_start..]));
    assert_eq!(echo["sha256"], sha256_hex(body.as_bytes()));
}
