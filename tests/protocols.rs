//! Protocols through coldgate: HTTP/2 (h2c and over TLS with ALPN), TLS certificate
//! reload, gRPC error statuses, and h2c towards the instance. Real binary, real sockets.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

const HOST: &str = "demo.local";

fn start_with(defaults: &str, predictor_args: &[&str], server_extra: &str, service_extra: &str) -> Coldgate {
    let dir = tempfile::tempdir().unwrap();
    let log = start_log_path(dir.path());
    let log_str = log.to_str().unwrap().to_string();
    let mut args: Vec<&str> = predictor_args.to_vec();
    args.extend_from_slice(&["--start-log", &log_str]);
    let config = one_service_config(defaults, &args)
        .replace("shutdown_grace = \"10s\"\n", &format!("shutdown_grace = \"10s\"\n{server_extra}\n"))
        .replace("readiness_path = \"/v2/models/demo/ready\"\n", &format!("readiness_path = \"/v2/models/demo/ready\"\n{service_extra}\n"));
    Coldgate::start_in(dir, &config)
}

async fn h2_sender<S>(io: S) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

fn h2_request(method: &str, path: &str, content_type: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{HOST}{path}"))
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_over_h2c_streams_unbuffered_cold_and_warm() {
    let coldgate = start_with("", &["--load-ms", "600"], "", "");
    for label in ["after a cold start", "warm"] {
        let mut sender = h2_sender(TcpStream::connect(coldgate.data).await.unwrap()).await;
        let response = sender
            .send_request(h2_request("GET", "/sse?events=6&interval_ms=200&size=20", "text/plain", ""))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{label}");
        assert_eq!(response.version(), http::Version::HTTP_2);
        let mut body = response.into_body();
        let mut arrivals = Vec::new();
        let mut received = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.unwrap().data_ref() {
                received.extend_from_slice(data);
                let events = received.windows(2).filter(|w| w == b"\n\n").count();
                while arrivals.len() < events {
                    arrivals.push(Instant::now());
                }
            }
        }
        assert_eq!(arrivals.len(), 6, "{label}: {:?}", String::from_utf8_lossy(&received));
        for pair in arrivals.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(120) && gap <= Duration::from_millis(450),
                "{label}: events {gap:?} apart instead of about 200 ms"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_get_grpc_statuses_when_rejected() {
    let coldgate = start_with("max_queued_requests = 1\nqueue_timeout = \"700ms\"", &["--load-ms", "10000"], "", "");
    let connection = TcpStream::connect(coldgate.data).await.unwrap();
    let mut sender = h2_sender(connection).await;

    // The first call is held until its queue_timeout: DEADLINE_EXCEEDED.
    let held = {
        let mut sender = sender.clone();
        tokio::spawn(async move {
            sender.send_request(h2_request("POST", "/inference.GRPCInferenceService/ModelInfer", "application/grpc", "x")).await
        })
    };
    coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["queue_depth"] == 1).await;

    // The queue is full: UNAVAILABLE, at once.
    let response = sender
        .send_request(h2_request("POST", "/inference.GRPCInferenceService/ModelInfer", "application/grpc", "x"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "gRPC errors travel in trailers-only responses");
    assert_eq!(response.headers()["grpc-status"], "14");
    assert!(response.headers()["grpc-message"].to_str().unwrap().contains("queue"));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty(), "a trailers-only response has no body");

    let response = held.await.unwrap().unwrap();
    assert_eq!(response.headers()["grpc-status"], "4");
}

fn certificate(names: &[&str]) -> (String, String, rustls::pki_types::CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let der = certified.cert.der().clone();
    (certified.cert.pem(), certified.signing_key.serialize_pem(), der)
}

fn tls_client(trusted: &[rustls::pki_types::CertificateDer<'static>], alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    coldgate: &Coldgate,
    connector: &tokio_rustls::TlsConnector,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
    let tcp = TcpStream::connect(coldgate.data).await?;
    connector.connect(rustls::pki_types::ServerName::try_from(HOST).unwrap(), tcp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_h2_and_http1_and_reloads_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem, first_der) = certificate(&[HOST]);
    let cert_file = dir.path().join("tls.crt");
    let key_file = dir.path().join("tls.key");
    std::fs::write(&cert_file, cert_pem).unwrap();
    std::fs::write(&key_file, key_pem).unwrap();
    let tls_table = format!("[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n", cert_file, key_file);
    let coldgate = start_with("", &["--load-ms", "200"], &tls_table, "");

    // HTTP/2 through ALPN, cold.
    let connector = tls_client(std::slice::from_ref(&first_der), &[b"h2", b"http/1.1"]);
    let stream = tls_connect(&coldgate, &connector).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut sender = h2_sender(stream).await;
    let response = sender.send_request(h2_request("GET", "/slow?ms=1", "text/plain", "")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.headers()["x-seen-forwarded-proto"], "https");

    // HTTP/1.1 through ALPN, warm.
    let connector = tls_client(std::slice::from_ref(&first_der), &[b"http/1.1"]);
    let stream = tls_connect(&coldgate, &connector).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request("GET", HOST, "/slow?ms=1", "")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // Plain HTTP on the TLS port fails instead of being served in clear.
    assert!(try_send(coldgate.data, request("GET", HOST, "/slow?ms=1", "")).await.is_err());

    // Replace the files: new connections get the new certificate.
    let (cert_pem, key_pem, second_der) = certificate(&[HOST]);
    std::fs::write(&key_file, key_pem).unwrap();
    std::fs::write(&cert_file, cert_pem).unwrap();
    let trusts_second = tls_client(std::slice::from_ref(&second_der), &[b"h2"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tls_connect(&coldgate, &trusts_second).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was not served within 10 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let trusts_first = tls_client(std::slice::from_ref(&first_der), &[b"h2"]);
    assert!(tls_connect(&coldgate, &trusts_first).await.is_err(), "the old certificate is still served");

    // A broken file keeps the current certificate.
    std::fs::write(&cert_file, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(tls_connect(&coldgate, &trusts_second).await.is_ok(), "a broken file replaced a good certificate");
    assert!(coldgate.log_text().contains("TLS certificate reload failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_service_reaches_instance_over_http2() {
    let coldgate = start_with("", &["--load-ms", "200"], "", "protocol = \"h2c\"");
    let response = send(coldgate.data, request("GET", HOST, "/slow?ms=1", "")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-seen-version"], "HTTP/2.0", "coldgate should speak h2c to the instance");
}
