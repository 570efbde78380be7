//! The lifecycle of one pod: ContainerCreating, process start, readiness probes,
//! crash-loop restarts with back-off, and graceful termination.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::kubelet::{
    container_status, refresh_deployment_status, set_condition, set_endpoint_conditions,
    update_endpoints, update_pod, DeleteReply, KubeletMessage,
};
use super::names::now_time;
use super::process::{signal_group, ProcessSpec, RunningProcess};
use super::resources::ResourceKind;
use super::store::ObjectKey;
use super::{Inner, PodTemplate};

/// A request from the controller to a pod task.
pub(super) enum PodCommand {
    Terminate { reply: Option<DeleteReply> },
}

/// Sends one HTTP/1.1 GET like the kubelet's HTTP probe. A status in 200..400 is
/// success, as for the kubelet.
async fn probe_once(address: SocketAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(address).await.ok()?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = Vec::with_capacity(64);
        let mut buffer = [0u8; 64];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
            let read = stream.read(&mut buffer).await.ok()?;
            if read == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..read]);
        }
        let line = String::from_utf8_lossy(&head);
        let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

async fn probe_loop(
    address: SocketAddr,
    path: String,
    period: Duration,
    timeout: Duration,
    results: mpsc::Sender<bool>,
) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let ok = probe_once(address, &path, timeout).await;
        if results.send(ok).await.is_err() {
            return;
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Supervision {
    Exited(ExitStatus),
    Terminated,
}

/// The lifecycle of one pod, from ContainerCreating to removal.
pub(super) struct PodRun {
    pub(super) inner: Arc<Inner>,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) deployment: String,
    pub(super) service: String,
    pub(super) ip: Ipv4Addr,
    pub(super) template: PodTemplate,
    pub(super) commands: mpsc::UnboundedReceiver<PodCommand>,
    pub(super) restart_count: i32,
}

fn substitute(text: &str, ip: Ipv4Addr, port: u16, pod: &str, namespace: &str) -> String {
    text.replace("{ip}", &ip.to_string())
        .replace("{port}", &port.to_string())
        .replace("{pod}", pod)
        .replace("{namespace}", namespace)
}

impl PodRun {
    pub(super) async fn run(mut self) {
        if !self.template.container_create_delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(self.template.container_create_delay) => {}
                command = self.commands.recv() => {
                    self.terminate(None, reply_of(command)).await;
                    return;
                }
            }
        }
        let options = &self.inner.options;
        let (initial, maximum, reset) = (
            options.crash_backoff_initial,
            options.crash_backoff_max,
            options.crash_backoff_reset,
        );
        let mut backoff = initial;
        loop {
            match self
                .inner
                .kubelet
                .processes
                .spawn(self.process_spec())
                .await
            {
                Ok(process) => {
                    let started = Instant::now();
                    let started_at = now_time();
                    self.record_running(process.pid, &started_at);
                    match self.supervise(process).await {
                        Supervision::Terminated => return,
                        Supervision::Exited(status) => {
                            if started.elapsed() >= reset {
                                backoff = initial;
                            }
                            self.record_crash(status, started_at, backoff);
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(namespace = %self.namespace, pod = %self.name, %error, ?backoff, "starting the pod process failed; retrying after back-off");
                    self.record_start_failure(&error.to_string());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                command = self.commands.recv() => {
                    self.terminate(None, reply_of(command)).await;
                    return;
                }
            }
            backoff = (backoff * 2).min(maximum);
            self.restart_count += 1;
        }
    }

    fn key(&self) -> ObjectKey {
        (self.namespace.clone(), self.name.clone())
    }

    fn process_spec(&self) -> ProcessSpec {
        let fill = |text: &str| {
            substitute(
                text,
                self.ip,
                self.template.port,
                &self.name,
                &self.namespace,
            )
        };
        let mut env: Vec<(String, String)> = self
            .template
            .env
            .iter()
            .map(|(k, v)| (k.clone(), fill(v)))
            .collect();
        env.push(("POD_NAME".to_string(), self.name.clone()));
        env.push(("POD_NAMESPACE".to_string(), self.namespace.clone()));
        env.push(("POD_IP".to_string(), self.ip.to_string()));
        ProcessSpec {
            program: fill(&self.template.program.to_string_lossy()).into(),
            args: self.template.args.iter().map(|arg| fill(arg)).collect(),
            env,
            log_path: self
                .inner
                .options
                .pod_log_dir
                .as_ref()
                .map(|dir| dir.join(format!("{}_{}.log", self.namespace, self.name))),
        }
    }

    /// Watches the process and its readiness until it exits or the pod is deleted.
    async fn supervise(&mut self, mut process: RunningProcess) -> Supervision {
        let (results, mut probe_results) = mpsc::channel(4);
        let address = SocketAddr::from((self.ip, self.template.port));
        let _prober = AbortOnDrop(tokio::spawn(probe_loop(
            address,
            self.template.readiness_path.clone(),
            self.template.probe_period,
            self.template.probe_timeout,
            results,
        )));
        let mut ready = false;
        let mut failures = 0u32;
        loop {
            tokio::select! {
                status = &mut process.exit => {
                    return Supervision::Exited(status.unwrap_or_else(|_| ExitStatus::from_raw(0)));
                }
                command = self.commands.recv() => {
                    self.terminate(Some(process), reply_of(command)).await;
                    return Supervision::Terminated;
                }
                Some(ok) = probe_results.recv() => {
                    if ok {
                        failures = 0;
                        if !ready {
                            ready = true;
                            self.record_readiness(true);
                        }
                    } else {
                        failures += 1;
                        if ready && failures >= self.template.readiness_failure_threshold.max(1) {
                            ready = false;
                            self.record_readiness(false);
                        }
                    }
                }
            }
        }
    }

    fn record_running(&self, pid: i32, started_at: &Time) {
        self.inner.kubelet.pids().insert(self.key(), pid);
        let restart_count = self.restart_count;
        update_pod(&self.inner, &self.namespace, &self.name, |pod| {
            if let Some(status) = pod.status.as_mut() {
                status.phase = Some("Running".to_string());
            }
            if let Some(container) = container_status(pod) {
                container.state = Some(ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(started_at.clone()),
                    }),
                    ..ContainerState::default()
                });
                container.started = Some(true);
                container.ready = false;
                container.restart_count = restart_count;
                container.container_id = Some(format!("fakekube://{pid}"));
            }
        });
        tracing::info!(namespace = %self.namespace, pod = %self.name, pid, restart_count, "pod process started");
    }

    fn record_readiness(&self, ready: bool) {
        let container_name = self.template.container_name.clone();
        update_pod(&self.inner, &self.namespace, &self.name, |pod| {
            if let Some(container) = container_status(pod) {
                container.ready = ready;
            }
            set_condition(pod, "ContainersReady", ready, &container_name);
            set_condition(pod, "Ready", ready, &container_name);
        });
        set_endpoint_conditions(
            &self.inner,
            &self.namespace,
            &self.service,
            &self.name,
            ready,
            ready,
            false,
        );
        refresh_deployment_status(&self.inner, &self.namespace, &self.deployment);
        tracing::info!(namespace = %self.namespace, pod = %self.name, ready, "pod readiness changed");
    }

    fn record_crash(&self, status: ExitStatus, started_at: Time, backoff: Duration) {
        self.inner.kubelet.pids().remove(&self.key());
        let exit_code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        tracing::warn!(namespace = %self.namespace, pod = %self.name, exit_code, ?backoff, "pod process exited; restarting after back-off");
        let container_name = self.template.container_name.clone();
        let message = format!(
            "back-off {backoff:?} restarting failed container={container_name} pod={}_{}",
            self.name, self.namespace
        );
        update_pod(&self.inner, &self.namespace, &self.name, |pod| {
            if let Some(container) = container_status(pod) {
                container.last_state = Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code,
                        reason: Some(
                            if exit_code == 0 { "Completed" } else { "Error" }.to_string(),
                        ),
                        started_at: Some(started_at),
                        finished_at: Some(now_time()),
                        container_id: container.container_id.clone(),
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                });
                container.state = Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("CrashLoopBackOff".to_string()),
                        message: Some(message),
                    }),
                    ..ContainerState::default()
                });
                container.ready = false;
                container.started = Some(false);
            }
            set_condition(pod, "ContainersReady", false, &container_name);
            set_condition(pod, "Ready", false, &container_name);
        });
        set_endpoint_conditions(
            &self.inner,
            &self.namespace,
            &self.service,
            &self.name,
            false,
            false,
            false,
        );
        refresh_deployment_status(&self.inner, &self.namespace, &self.deployment);
    }

    fn record_start_failure(&self, error: &str) {
        let container_name = self.template.container_name.clone();
        update_pod(&self.inner, &self.namespace, &self.name, |pod| {
            if let Some(container) = container_status(pod) {
                container.state = Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("RunContainerError".to_string()),
                        message: Some(error.to_string()),
                    }),
                    ..ContainerState::default()
                });
                container.ready = false;
                container.started = Some(false);
            }
            set_condition(pod, "ContainersReady", false, &container_name);
            set_condition(pod, "Ready", false, &container_name);
        });
        set_endpoint_conditions(
            &self.inner,
            &self.namespace,
            &self.service,
            &self.name,
            false,
            false,
            false,
        );
        refresh_deployment_status(&self.inner, &self.namespace, &self.deployment);
    }

    /// Deletes the pod gracefully: marks it terminating in the Pod and the
    /// EndpointSlice, sends SIGTERM, sends SIGKILL after the grace period, and
    /// removes the endpoint and the Pod once the process is gone.
    async fn terminate(&mut self, process: Option<RunningProcess>, reply: Option<DeleteReply>) {
        let grace = self.template.termination_grace_period;
        let marked = self.inner.store().mark_deleting(
            ResourceKind::Pod,
            &self.namespace,
            &self.name,
            grace.as_secs_f64().ceil() as i64,
        );
        // NOTE: kube-controller-manager keeps serving equal to the pod's readiness
        // while it terminates, but the fake sets serving=false at once.
        set_endpoint_conditions(
            &self.inner,
            &self.namespace,
            &self.service,
            &self.name,
            false,
            false,
            true,
        );
        refresh_deployment_status(&self.inner, &self.namespace, &self.deployment);
        if let Some(reply) = reply {
            let _ = reply.send(marked);
        }
        tracing::info!(namespace = %self.namespace, pod = %self.name, "pod terminating");

        if let Some(mut process) = process {
            signal_group(process.pid, libc::SIGTERM);
            let exited_in_time = tokio::time::timeout(grace, &mut process.exit).await.is_ok();
            if !exited_in_time {
                tracing::info!(namespace = %self.namespace, pod = %self.name, ?grace, "grace period over; sending SIGKILL");
                signal_group(process.pid, libc::SIGKILL);
                if tokio::time::timeout(Duration::from_secs(5), &mut process.exit)
                    .await
                    .is_err()
                {
                    tracing::error!(namespace = %self.namespace, pod = %self.name, pid = process.pid, "pod process survived SIGKILL for 5 s");
                }
            }
        }

        self.inner.kubelet.pids().remove(&self.key());
        let name = self.name.clone();
        update_endpoints(&self.inner, &self.namespace, &self.service, |endpoints| {
            endpoints.retain(|endpoint| {
                endpoint.target_ref.as_ref().and_then(|r| r.name.as_deref()) != Some(&name)
            });
        });
        if let Err(error) =
            self.inner
                .store()
                .remove(ResourceKind::Pod, &self.namespace, &self.name)
        {
            tracing::error!(namespace = %self.namespace, pod = %self.name, ?error, "removing the pod object failed");
        }
        refresh_deployment_status(&self.inner, &self.namespace, &self.deployment);
        tracing::info!(namespace = %self.namespace, pod = %self.name, "pod deleted");
        let _ = self.inner.kubelet.messages.send(KubeletMessage::PodGone {
            deployment: (self.namespace.clone(), self.deployment.clone()),
            pod: self.name.clone(),
            ip: self.ip,
        });
    }
}

fn reply_of(command: Option<PodCommand>) -> Option<DeleteReply> {
    match command {
        Some(PodCommand::Terminate { reply }) => reply,
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitute_fills_placeholders() {
        let text = substitute(
            "--host {ip} --port {port} {pod}.{namespace}",
            Ipv4Addr::new(127, 0, 1, 2),
            80,
            "p",
            "n",
        );
        assert_eq!(text, "--host 127.0.1.2 --port 80 p.n");
    }
}
