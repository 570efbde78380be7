//! The `process` backend: one local child process per service, started on demand.
//!
//! The command runs directly (no shell), so nothing from a request or from the
//! configuration is interpreted by a shell. `{port}` in the arguments and environment
//! values becomes a free loopback port. The child gets its own process group, so that a
//! Ctrl-C in coldgate's terminal does not hit it before coldgate has drained, and so that
//! stopping it also stops any workers it forked.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use prometheus::IntCounterVec;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Backend, BackendError, EndpointEvents, ScaleDown};
use crate::config::{format_duration, ProcessConfig};

/// How long to wait for a process to disappear after SIGKILL before giving up on it.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Longest child output line forwarded to the log; longer lines are cut.
const MAX_LOG_LINE: usize = 4096;

struct RunningProcess {
    pid: i32,
    addr: SocketAddr,
    /// `None` while the process runs, then its exit status.
    exit: watch::Receiver<Option<ExitStatus>>,
    /// Set by `scale_down`, so the exit is logged as expected rather than as a crash.
    stopping: Arc<AtomicBool>,
}

pub struct ProcessBackend {
    service: String,
    config: Mutex<ProcessConfig>,
    running: Arc<Mutex<Option<RunningProcess>>>,
    exits: IntCounterVec,
}

impl ProcessBackend {
    pub fn new(service: &str, config: ProcessConfig, exits: IntCounterVec) -> Self {
        for expected in ["true", "false"] {
            exits.with_label_values(&[service, expected]).inc_by(0);
        }
        ProcessBackend {
            service: service.to_string(),
            config: Mutex::new(config),
            running: Arc::new(Mutex::new(None)),
            exits,
        }
    }

    /// Replaces the command settings; they apply from the next start.
    pub fn update(&self, config: ProcessConfig) {
        *self.config.lock() = config;
    }

    fn build_command(&self, port: u16) -> (Command, String) {
        let config = self.config.lock().clone();
        let port = port.to_string();
        let substitute = |value: &str| value.replace("{port}", &port);

        let mut command = Command::new(&config.command);
        command
            .args(config.args.iter().map(|arg| substitute(arg)))
            .envs(config.env.iter().map(|(key, value)| (key, substitute(value))))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &config.working_dir {
            command.current_dir(dir);
        }
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe. PR_SET_PDEATHSIG makes the kernel kill the child if
        // coldgate dies without stopping it (SIGKILL, OOM kill), so no model server is
        // left holding a GPU. The signal follows the forking thread; tokio's worker
        // threads live as long as the runtime, which lives as long as coldgate.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        (command, config.command)
    }

    fn stop_grace(&self) -> Duration {
        self.config.lock().stop_grace
    }
}

/// Returns a loopback port that was free a moment ago.
// NOTE: another program can take the port between this check and the child's bind; the
// child then fails to start and held requests get a 502 naming its exit status.
fn free_loopback_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Logs each line the child writes, and reports it as a sign of life, which makes a pending
/// readiness probe run at once.
fn forward_output(
    service: String,
    stream: &'static str,
    pid: i32,
    reader: impl AsyncRead + Unpin + Send + 'static,
    events: EndpointEvents,
    addr: SocketAddr,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        loop {
            match lines.next_line().await {
                Ok(Some(mut line)) => {
                    events.output(addr, &line);
                    if line.len() > MAX_LOG_LINE {
                        let mut cut = MAX_LOG_LINE;
                        while !line.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        line.truncate(cut);
                    }
                    info!(target: "coldgate::child", service = %service, pid, stream, "{line}");
                }
                Ok(None) => return,
                Err(error) => {
                    // Output that is not UTF-8 ends the forwarding for this stream.
                    warn!(service = %service, pid, stream, %error, "stopped forwarding child output");
                    return;
                }
            }
        }
    });
}

fn signal_group(pid: i32, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions. A negative pid addresses the process
    // group that the child leads (it was started with process_group(0)).
    let result = unsafe { libc::kill(-pid, signal) };
    if result == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ESRCH) {
        return Ok(()); // Already gone.
    }
    Err(error)
}

async fn wait_for_exit(exit: &mut watch::Receiver<Option<ExitStatus>>, limit: Duration) -> bool {
    tokio::time::timeout(limit, exit.wait_for(|status| status.is_some())).await.is_ok()
}

#[async_trait]
impl Backend for ProcessBackend {
    async fn scale_up(&self, events: EndpointEvents) -> Result<(), BackendError> {
        if let Some(running) = self.running.lock().as_ref() {
            if running.exit.borrow().is_none() {
                events.discovered(running.addr);
                return Ok(());
            }
        }

        let port = free_loopback_port().map_err(BackendError::NoPort)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let (mut command, program) = self.build_command(port);
        let mut child = command
            .spawn()
            .map_err(|source| BackendError::Spawn { command: program.clone(), source })?;
        let pid = child.id().map(|id| id as i32).unwrap_or_default();
        info!(service = %self.service, pid, endpoint = %addr, command = %program, "started process");

        if let Some(stdout) = child.stdout.take() {
            forward_output(self.service.clone(), "stdout", pid, stdout, events.clone(), addr);
        }
        if let Some(stderr) = child.stderr.take() {
            forward_output(self.service.clone(), "stderr", pid, stderr, events.clone(), addr);
        }

        let (exit_sender, exit_receiver) = watch::channel(None);
        let stopping = Arc::new(AtomicBool::new(false));
        *self.running.lock() = Some(RunningProcess { pid, addr, exit: exit_receiver, stopping: stopping.clone() });

        let running = self.running.clone();
        let service = self.service.clone();
        let exits = self.exits.clone();
        let exit_events = events.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let expected = stopping.load(Ordering::Acquire);
            let reason = match &status {
                Ok(status) => format!("process {pid} exited ({status})"),
                Err(error) => format!("failed to wait for process {pid}: {error}"),
            };
            exits.with_label_values(&[service.as_str(), if expected { "true" } else { "false" }]).inc();
            if expected {
                info!(service = %service, pid, "{reason}");
            } else {
                warn!(service = %service, pid, "{reason}");
            }
            {
                let mut running = running.lock();
                if running.as_ref().is_some_and(|r| r.pid == pid) {
                    *running = None;
                }
            }
            let _ = exit_sender.send(Some(status.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(-1))));
            exit_events.lost(addr, reason);
        });

        events.discovered(addr);
        Ok(())
    }

    async fn scale_down(&self) -> Result<ScaleDown, BackendError> {
        let (pid, mut exit, stopping) = {
            let running = self.running.lock();
            let Some(process) = running.as_ref() else { return Ok(ScaleDown::Done) };
            (process.pid, process.exit.clone(), process.stopping.clone())
        };
        if exit.borrow().is_some() {
            return Ok(ScaleDown::Done);
        }
        let grace = self.stop_grace();
        stopping.store(true, Ordering::Release);
        info!(service = %self.service, pid, grace = %format_duration(grace), "stopping process: SIGTERM");
        signal_group(pid, libc::SIGTERM).map_err(|source| BackendError::Stop { pid, source })?;
        if wait_for_exit(&mut exit, grace).await {
            return Ok(ScaleDown::Done);
        }
        warn!(service = %self.service, pid, "process did not exit within stop_grace; sending SIGKILL");
        signal_group(pid, libc::SIGKILL).map_err(|source| BackendError::Stop { pid, source })?;
        if !wait_for_exit(&mut exit, KILL_WAIT).await {
            warn!(service = %self.service, pid, "process still present after SIGKILL");
        }
        Ok(ScaleDown::Done)
    }

    async fn shutdown(&self) {
        if let Err(error) = self.scale_down().await {
            warn!(service = %self.service, %error, "stopping the process at shutdown failed");
        }
    }

    fn kind(&self) -> &'static str {
        "process"
    }
}
