//! The Kubernetes backend against the project's fake API server and simulated kubelet:
//! three coldgate replicas (real processes) in front of Deployments whose pods are real
//! simulated-predictor processes on loopback addresses.

mod common;
#[allow(dead_code)]
#[path = "support/fake_kube/mod.rs"]
mod fake_kube;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use fake_kube::{ClusterOptions, DeploymentSpec, FakeCluster, Fault, PodTemplate, Verb};
use http::StatusCode;

const NAMESPACE: &str = "models";
const IDLE_TIMEOUT: &str = "3s";
const IDLE: Duration = Duration::from_secs(3);
const LEASE_DURATION: Duration = Duration::from_secs(2);

struct Cluster {
    fake: FakeCluster,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts a fake cluster with one Deployment per `(name, replicas, extra predictor args)`,
/// each behind a Service of the same name. `block` picks the pods' loopback range so
/// tests running at the same time never share pod addresses.
async fn cluster(block: u8, deployments: &[(&str, i32, &[&str])]) -> Cluster {
    let options = ClusterOptions { pod_ip_start: Some(Ipv4Addr::new(127, block, 1, 1)), ..Default::default() };
    let fake = FakeCluster::start(options).await.expect("start the fake API server");
    for (name, replicas, extra) in deployments {
        let mut args = vec!["predictor", "--host", "{ip}", "--port", "{port}", "--model", "iris", "--load-ms", "300"];
        args.extend_from_slice(extra);
        let mut template = PodTemplate::new(BIN, args);
        template.readiness_path = "/v2/models/iris/ready".into();
        template.termination_grace_period = Duration::from_secs(3);
        fake.add_deployment(
            NAMESPACE,
            name,
            DeploymentSpec { replicas: *replicas, template, service: name.to_string(), labels: Default::default() },
        )
        .expect("add the Deployment");
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {NAMESPACE}\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            fake.url()
        ),
    )
    .unwrap();
    Cluster { fake, kubeconfig, _dir: dir }
}

/// coldgate config for one replica; each name in `services` is a Deployment and Service
/// of that name, routed from host `<name>.local`.
fn replica_config(cluster: &Cluster, identity: &str, services: &[&str], defaults: &str) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\nshutdown_grace = \"5s\"\n\n\
         [kubernetes]\nkubeconfig = {:?}\nnamespace = \"{NAMESPACE}\"\nlease_namespace = \"coldgate\"\n\
         lease_duration = \"2s\"\nactivity_interval = \"200ms\"\nidentity = \"{identity}\"\n\n\
         [defaults]\nidle_timeout = \"{IDLE_TIMEOUT}\"\n{defaults}\n\n",
        cluster.kubeconfig
    );
    if !defaults.contains("queue_timeout") {
        text = text.replace("[defaults]\n", "[defaults]\nqueue_timeout = \"60s\"\n");
    }
    for name in services {
        text.push_str(&format!(
            "[[service]]\nname = \"{name}\"\nhosts = [\"{name}.local\"]\nreadiness_path = \"/v2/models/iris/ready\"\n\
             [service.kubernetes]\ndeployment = \"{name}\"\nservice = \"{name}\"\nport = \"http\"\nreplicas = 1\n\n"
        ));
    }
    text
}

fn start_replicas(cluster: &Cluster, count: usize, services: &[&str], defaults: &str) -> Vec<Coldgate> {
    (0..count)
        .map(|i| Coldgate::start(&replica_config(cluster, &format!("coldgate-{i}"), services, defaults)))
        .collect()
}

/// Writes of spec.replicas made by coldgate (its field manager), as (from, to) pairs.
fn coldgate_writes(cluster: &Cluster, deployment: &str) -> Vec<(i32, i32)> {
    cluster
        .fake
        .scale_writes(NAMESPACE, deployment)
        .into_iter()
        .filter(|w| w.field_manager.as_deref() == Some("coldgate") && w.from != w.to)
        .map(|w| (w.from, w.to))
        .collect()
}

async fn wait_for_replicas(cluster: &Cluster, deployment: &str, expected: i32, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if cluster.fake.replicas(NAMESPACE, deployment) == Some(expected) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{deployment} did not reach {expected} replicas within {limit:?}; writes: {:?}",
            cluster.fake.scale_writes(NAMESPACE, deployment)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn predict(coldgate: &Coldgate, service: &str) -> http::Response<bytes::Bytes> {
    let body = r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}]}"#;
    send(coldgate.data, request("POST", &format!("{service}.local"), "/v2/models/iris/infer", body)).await
}

/// Returns the index of the replica that reports itself leader, skipping `dead`.
async fn leader_index(replicas: &[Coldgate], dead: Option<usize>) -> Option<usize> {
    for (index, replica) in replicas.iter().enumerate() {
        if Some(index) == dead {
            continue;
        }
        if replica.metrics().await.lines().any(|l| l == "coldgate_leader 1") {
            return Some(index);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_across_replicas_scales_up_once() {
    let cluster = cluster(31, &[("iris", 0, &[])]).await;
    let replicas = start_replicas(&cluster, 3, &["iris"], "");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..150 {
        let addr = replicas[i % 3].data;
        tasks.push(tokio::spawn(async move {
            let body = r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[7]}]}"#;
            send(addr, request("POST", "iris.local", "/v2/models/iris/infer", body)).await
        }));
    }
    for task in tasks {
        let response = task.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{:?}", response.body());
    }
    let elapsed = started.elapsed();
    let writes = coldgate_writes(&cluster, "iris");
    let ups = writes.iter().filter(|w| **w == (0, 1)).count();
    assert!((1..=3).contains(&ups), "expected one scale-up write per replica at most: {writes:?}");
    assert_eq!(cluster.fake.replicas(NAMESPACE, "iris"), Some(1));
    let scaled_up_logs: usize = replicas.iter().map(|r| r.log_text().matches("scaled up from zero").count()).sum();
    assert_eq!(scaled_up_logs, ups, "each write is one replica's 'scaled up from zero'");
    eprintln!("k8s storm: 150 requests over 3 replicas all 200 in {elapsed:?}; scale-up writes: {ups}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_on_one_replica_keeps_the_service_up() {
    let cluster = cluster(32, &[("iris", 0, &[])]).await;
    let replicas = start_replicas(&cluster, 3, &["iris"], "");
    assert_eq!(predict(&replicas[0], "iris").await.status(), StatusCode::OK);

    // Traffic only through replica 2, for three idle timeouts.
    let until = Instant::now() + IDLE * 3;
    while Instant::now() < until {
        assert_eq!(predict(&replicas[2], "iris").await.status(), StatusCode::OK);
        assert_eq!(cluster.fake.replicas(NAMESPACE, "iris"), Some(1), "scaled down while replica 2 had traffic");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(!coldgate_writes(&cluster, "iris").contains(&(1, 0)), "no scale-down while busy");

    // All idle: exactly one scale-down write.
    let took = wait_for_replicas(&cluster, "iris", 0, IDLE + LEASE_DURATION * 3 + Duration::from_secs(5)).await;
    tokio::time::sleep(IDLE).await;
    let downs = coldgate_writes(&cluster, "iris").iter().filter(|w| **w == (1, 0)).count();
    assert_eq!(downs, 1, "exactly one scale-down write: {:?}", coldgate_writes(&cluster, "iris"));
    eprintln!("k8s idle: scaled to zero {took:?} after the last request (idle_timeout {IDLE:?}), {downs} write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_raised_by_an_autoscaler_are_never_lowered() {
    let cluster = cluster(33, &[("iris", 0, &[])]).await;
    let replicas = start_replicas(&cluster, 3, &["iris"], "");
    assert_eq!(predict(&replicas[1], "iris").await.status(), StatusCode::OK);
    cluster.fake.set_replicas(NAMESPACE, "iris", 3, "hpa").expect("raise replicas like an HPA");
    tokio::time::sleep(IDLE * 3).await;
    assert_eq!(cluster.fake.replicas(NAMESPACE, "iris"), Some(3));
    let lowered: Vec<_> = coldgate_writes(&cluster, "iris").into_iter().filter(|(from, to)| to < from).collect();
    assert!(lowered.is_empty(), "coldgate lowered replicas an autoscaler set: {lowered:?}");
    let skipped = replicas.iter().any(|r| r.log_text().contains("scale-down skipped"));
    assert!(skipped, "the leader should have seen the count and skipped the scale-down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_takes_over_when_the_leader_dies() {
    let cluster = cluster(34, &[("iris", 0, &[])]).await;
    let mut replicas = start_replicas(&cluster, 3, &["iris"], "");
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        if let Some(index) = leader_index(&replicas, None).await {
            break index;
        }
        assert!(Instant::now() < deadline, "no replica became leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let survivor = (leader + 1) % 3;
    assert_eq!(predict(&replicas[survivor], "iris").await.status(), StatusCode::OK);

    // SIGKILL: the leader cannot release its Lease; another replica must wait it out.
    unsafe { libc::kill(replicas[leader].pid(), libc::SIGKILL) };
    replicas[leader].terminate(Duration::from_secs(5));
    let killed = Instant::now();
    let took = wait_for_replicas(&cluster, "iris", 0, IDLE + LEASE_DURATION * 3 + Duration::from_secs(6)).await;
    let new_leader = leader_index(&replicas, Some(leader)).await;
    assert!(new_leader.is_some_and(|i| i != leader), "no new leader after the old one died");
    eprintln!("k8s failover: scaled to zero {took:?} after the leader was killed ({:?} since kill)", killed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_replicas_rebuild_state_from_the_api() {
    let cluster = cluster(35, &[("iris", 0, &[]), ("left", 0, &[])]).await;
    let mut first = start_replicas(&cluster, 3, &["iris", "left"], "");
    assert_eq!(predict(&first[0], "left").await.status(), StatusCode::OK);
    assert_eq!(cluster.fake.replicas(NAMESPACE, "left"), Some(1));
    for replica in &mut first {
        unsafe { libc::kill(replica.pid(), libc::SIGKILL) };
        replica.terminate(Duration::from_secs(5));
    }

    // New replicas know nothing but what the API tells them.
    let started = Instant::now();
    let replicas = start_replicas(&cluster, 3, &["iris", "left"], "");
    assert_eq!(predict(&replicas[2], "iris").await.status(), StatusCode::OK, "a service at 0 wakes on request");
    let took = wait_for_replicas(&cluster, "left", 0, IDLE + LEASE_DURATION * 4 + Duration::from_secs(8)).await;
    assert!(started.elapsed() >= IDLE, "scaled down before idle_timeout had passed since start");
    eprintln!("k8s restart: the service left at 1 went to 0 {:?} after the new replicas started", started.elapsed().min(took + IDLE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_outage_keeps_warm_services_serving() {
    let cluster = cluster(36, &[("warm", 0, &[]), ("cold", 0, &[])]).await;
    let replicas = start_replicas(&cluster, 3, &["warm", "cold"], "queue_timeout = \"4s\"");
    assert_eq!(predict(&replicas[0], "warm").await.status(), StatusCode::OK);
    for replica in &replicas {
        replica.wait_for_service("warm", Duration::from_secs(10), |s| s["state"] == "serving").await;
    }

    cluster.fake.stop_api().await;
    let outage = Instant::now();
    let mut cold_checked = false;
    while outage.elapsed() < Duration::from_secs(30) {
        for replica in &replicas {
            let response = predict(replica, "warm").await;
            assert_eq!(response.status(), StatusCode::OK, "a warm service failed during the API outage");
        }
        if !cold_checked {
            let sent = Instant::now();
            let response = predict(&replicas[1], "cold").await;
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("Kubernetes API"), "the 503 must name the cause: {message}");
            assert!(sent.elapsed() >= Duration::from_millis(3500), "failed before its deadline");
            cold_checked = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    cluster.fake.start_api().await.unwrap();

    // Held requests that arrive right after the API returns may still time out while the
    // watches reconnect; the service must be reachable within a few seconds.
    let recovered = Instant::now();
    loop {
        let response = predict(&replicas[2], "cold").await;
        if response.status() == StatusCode::OK {
            break;
        }
        assert!(recovered.elapsed() < Duration::from_secs(20), "the cold service did not recover: {}", response.status());
    }
    assert_eq!(predict(&replicas[0], "warm").await.status(), StatusCode::OK);
    eprintln!("k8s outage: warm service served for 30 s without the API; cold start after recovery took {:?}", recovered.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_scale_up_fails_held_requests_at_once() {
    let cluster = cluster(37, &[("iris", 0, &[])]).await;
    let replicas = start_replicas(&cluster, 1, &["iris"], "");
    cluster.fake.inject_failures(Fault { verb: Verb::Any, resource: "deployments/scale".into(), status: 403, count: 1 });
    let sent = Instant::now();
    let response = predict(&replicas[0], "iris").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(sent.elapsed() < Duration::from_secs(5), "a 403 must fail held requests at once");
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(body["error"]["code"], "backend_unavailable");
    assert!(body["error"]["message"].as_str().unwrap().contains("forbids"), "{body}");

    // The fault is used up: the next request starts the service.
    assert_eq!(predict(&replicas[0], "iris").await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_looping_pods_fail_held_requests_fast() {
    let cluster = cluster(38, &[("iris", 0, &["--fail-start-ms", "100"])]).await;
    let replicas = start_replicas(&cluster, 1, &["iris"], "");
    let sent = Instant::now();
    let response = predict(&replicas[0], "iris").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("CrashLoopBackOff"), "{body}");
    assert!(sent.elapsed() < Duration::from_secs(15), "took {:?}, well before the 60 s queue_timeout is expected", sent.elapsed());
}

#[test]
fn kubectl_reads_and_scales_through_the_fake() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let cluster = cluster(39, &[("iris", 0, &[])]).await;
        let home = tempfile::tempdir().unwrap();
        let kubectl = |args: &[&str]| {
            let output = std::process::Command::new("kubectl")
                .args(["--server", &cluster.fake.url(), "-n", NAMESPACE])
                .args(args)
                .env("KUBECONFIG", "/dev/null")
                .env("HOME", home.path())
                .output()
                .expect("kubectl must be installed (it is on the machine image)");
            assert!(output.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8_lossy(&output.stdout).to_string()
        };
        assert!(kubectl(&["get", "deployments"]).contains("iris"));
        kubectl(&["scale", "deployment/iris", "--replicas=1"]);
        cluster.fake.wait_for_ready_addresses(NAMESPACE, "iris", 1, Duration::from_secs(15)).await.expect("a ready pod");
        let slices = kubectl(&["get", "endpointslices", "-o", "json"]);
        let slices: serde_json::Value = serde_json::from_str(&slices).unwrap();
        assert_eq!(slices["items"][0]["endpoints"][0]["conditions"]["ready"], true);
    });
}
