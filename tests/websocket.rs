//! WebSocket sessions through the real coldgate binary, with the simulated predictor's
//! `/ws` endpoint as the server and tokio-tungstenite as an independent client.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use futures::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{client_async, WebSocketStream};

const HOST: &str = "demo.local";
/// Upper bound for one handshake, including a cold start of under a second.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(15);
/// Upper bound for one message to come back, far above the few milliseconds it takes.
const MESSAGE_LIMIT: Duration = Duration::from_secs(5);

type Socket = WebSocketStream<TcpStream>;

/// Builds a config whose predictor logs its starts into the test's temp dir.
fn start_with(defaults: &str, predictor_args: &[&str]) -> Coldgate {
    let dir = tempfile::tempdir().unwrap();
    let log = start_log_path(dir.path());
    let log = log.to_str().unwrap().to_string();
    let mut args: Vec<&str> = predictor_args.to_vec();
    args.extend_from_slice(&["--start-log", &log]);
    Coldgate::start_in(dir, &one_service_config(defaults, &args))
}

fn starts(coldgate: &Coldgate) -> (usize, usize) {
    start_log_counts(&start_log_path(coldgate.dir.path()))
}

/// Opens a WebSocket to `path` on the service through coldgate's data port.
async fn connect(data: SocketAddr, path: &str) -> (Socket, StatusCode) {
    let stream = TcpStream::connect(data).await.expect("connect to coldgate");
    let request = format!("ws://{HOST}{path}").into_client_request().unwrap();
    let handshake = timeout(HANDSHAKE_LIMIT, client_async(request, stream))
        .await
        .unwrap_or_else(|_| panic!("WebSocket handshake for {path} timed out after {HANDSHAKE_LIMIT:?}"));
    let (socket, response) = match handshake {
        Ok(done) => done,
        Err(WsError::Http(response)) => {
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
            panic!("WebSocket handshake for {path} got {} instead of 101: {body}", response.status());
        }
        Err(error) => panic!("WebSocket handshake for {path} failed: {error}"),
    };
    (socket, response.status())
}

async fn next_message(socket: &mut Socket, label: &str) -> Message {
    match timeout(MESSAGE_LIMIT, socket.next()).await {
        Ok(Some(Ok(message))) => message,
        Ok(Some(Err(error))) => panic!("{label}: reading from the WebSocket failed: {error}"),
        Ok(None) => panic!("{label}: the WebSocket ended early"),
        Err(_) => panic!("{label}: no message within {MESSAGE_LIMIT:?}"),
    }
}

async fn send_message(socket: &mut Socket, message: Message, label: &str) {
    timeout(MESSAGE_LIMIT, socket.send(message))
        .await
        .unwrap_or_else(|_| panic!("{label}: sending timed out"))
        .unwrap_or_else(|error| panic!("{label}: sending failed: {error}"));
}

/// Checks text and binary echoes (with 7-, 16- and 64-bit frame lengths) and ping.
async fn assert_echoes(socket: &mut Socket, label: &str) {
    let text = Message::text(format!("hello from the {label} test"));
    send_message(socket, text.clone(), label).await;
    assert_eq!(next_message(socket, label).await, text, "{label}: text echo");

    for length in [300, 70_000] {
        let payload: Vec<u8> = (0..length).map(|i| (i % 251) as u8).collect();
        let binary = Message::binary(payload);
        send_message(socket, binary.clone(), label).await;
        assert_eq!(next_message(socket, label).await, binary, "{label}: binary echo of {length} bytes");
    }

    send_message(socket, Message::Ping(b"are you there".to_vec().into()), label).await;
    let pong = next_message(socket, label).await;
    assert_eq!(pong, Message::Pong(b"are you there".to_vec().into()), "{label}: ping answer");
}

/// Sends a normal close and expects the server's close reply, then the end of the stream.
async fn close_cleanly(socket: &mut Socket, label: &str) {
    let frame = CloseFrame { code: CloseCode::Normal, reason: "done".into() };
    timeout(MESSAGE_LIMIT, socket.close(Some(frame)))
        .await
        .unwrap_or_else(|_| panic!("{label}: sending the close frame timed out"))
        .unwrap_or_else(|error| panic!("{label}: sending the close frame failed: {error}"));

    match next_message(socket, label).await {
        Message::Close(Some(reply)) => assert_eq!(reply.code, CloseCode::Normal, "{label}: close reply code"),
        other => panic!("{label}: expected the server's close reply, got {other:?}"),
    }
    match timeout(MESSAGE_LIMIT, socket.next()).await {
        Ok(None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed))) => {}
        Ok(Some(other)) => panic!("{label}: expected the end of the stream after the close, got {other:?}"),
        Err(_) => panic!("{label}: the connection stayed open {MESSAGE_LIMIT:?} after the close handshake"),
    }
}

async fn predictor_stats(coldgate: &Coldgate) -> serde_json::Value {
    let (status, body) = get(coldgate.data, HOST, "/stats").await;
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&body).expect("/stats is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_cold_start_then_warm_echoes() {
    let coldgate = start_with("", &["--load-ms", "800"]);
    assert_eq!(coldgate.service_status("demo").await["state"], "idle");

    let started = Instant::now();
    let connecting = tokio::spawn(connect(coldgate.data, "/ws"));
    // The upgrade request must wait in the queue, not fail or reach the loading model.
    coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["queue_depth"] == 1).await;
    let (mut socket, status) = connecting.await.unwrap();
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::SWITCHING_PROTOCOLS);
    assert!(waited >= Duration::from_millis(700), "handshake completed {waited:?} after the request, before the model could have loaded");
    assert_echoes(&mut socket, "cold").await;
    close_cleanly(&mut socket, "cold").await;
    assert_eq!(starts(&coldgate), (1, 1), "the cold WebSocket should start exactly one predictor");

    let (mut socket, status) = connect(coldgate.data, "/ws").await;
    assert_eq!(status, StatusCode::SWITCHING_PROTOCOLS);
    assert_echoes(&mut socket, "warm").await;
    close_cleanly(&mut socket, "warm").await;
    assert_eq!(starts(&coldgate), (1, 1), "the warm WebSocket started another predictor");

    let stats = predictor_stats(&coldgate).await;
    assert_eq!(stats["websockets"], 2, "upgraded connections seen by the predictor: {stats}");
    eprintln!("cold WebSocket handshake completed after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_websocket_keeps_service_busy() {
    let coldgate = start_with("idle_timeout = \"500ms\"", &["--load-ms", "100"]);
    let (mut socket, status) = connect(coldgate.data, "/ws").await;
    assert_eq!(status, StatusCode::SWITCHING_PROTOCOLS);
    let pid = predictor_stats(&coldgate).await["pid"].as_i64().unwrap() as i32;

    // About 2 s of messages 200 ms apart, four times idle_timeout.
    for round in 0..10 {
        let label = format!("round {round}");
        let message = Message::text(format!("keep-alive {round}"));
        send_message(&mut socket, message.clone(), &label).await;
        assert_eq!(next_message(&mut socket, &label).await, message, "{label}: echo");
        let status = coldgate.service_status("demo").await;
        assert_eq!(status["state"], "serving", "{label}: an open WebSocket must keep the service serving: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A silent socket counts too: no frames for more than twice idle_timeout.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let status = coldgate.service_status("demo").await;
    assert_eq!(status["state"], "serving", "a silent open WebSocket must keep the service serving: {status}");
    assert_echoes(&mut socket, "after the silence").await;
    assert!(process_alive(pid), "predictor {pid} stopped while the WebSocket was open");
    assert_eq!(starts(&coldgate), (1, 1), "the predictor was restarted while the WebSocket was open");

    close_cleanly(&mut socket, "busy").await;
    let closed = Instant::now();
    coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["state"] == "idle").await;
    let idle_after = closed.elapsed();
    assert!(idle_after >= Duration::from_millis(450), "service went idle {idle_after:?} after the close, before idle_timeout (500 ms) had passed");
    assert!(idle_after <= Duration::from_millis(3500), "service went idle only {idle_after:?} after the close");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!process_alive(pid), "predictor {pid} still running after scale to zero");
    eprintln!("service went idle {idle_after:?} after the WebSocket closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_pushed_ticks_arrive_unbuffered() {
    let coldgate = start_with("", &["--load-ms", "800"]);
    let (mut socket, status) = connect(coldgate.data, "/ws?ticks=6&interval_ms=200").await;
    assert_eq!(status, StatusCode::SWITCHING_PROTOCOLS);

    let mut arrivals = Vec::new();
    for index in 0..6 {
        let label = format!("tick {index}");
        assert_eq!(next_message(&mut socket, &label).await, Message::text(label.clone()));
        arrivals.push(Instant::now());
    }
    for (index, pair) in arrivals.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(120) && gap <= Duration::from_millis(450),
            "ticks {index} and {} arrived {gap:?} apart instead of about 200 ms", index + 1
        );
    }

    // After the ticks the session keeps echoing.
    assert_echoes(&mut socket, "after the ticks").await;
    close_cleanly(&mut socket, "ticks").await;
}
