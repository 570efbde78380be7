//! Pod processes: started from one long-lived thread, each in its own process group,
//! with PR_SET_PDEATHSIG so they die with that thread, and reaped by a waiter thread.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Program, arguments, environment and log file of one container start.
#[derive(Debug)]
pub(super) struct ProcessSpec {
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    /// File that receives stdout and stderr (appended), or None to discard them.
    pub(super) log_path: Option<PathBuf>,
}

/// A started process. `exit` resolves once the process has exited and every other
/// process left in its group has been killed.
pub(super) struct RunningProcess {
    pub(super) pid: i32,
    pub(super) exit: oneshot::Receiver<ExitStatus>,
}

struct SpawnRequest {
    spec: ProcessSpec,
    reply: oneshot::Sender<io::Result<RunningProcess>>,
}

/// Starts and tracks pod processes.
///
/// PR_SET_PDEATHSIG fires when the thread that forked the child exits, not when the
/// process does, so all forks happen on one dedicated thread that lives as long as
/// the supervisor. If the test process dies, that thread dies with it and the
/// kernel sends SIGKILL to every pod process.
pub(super) struct ProcessSupervisor {
    requests: Mutex<Option<std_mpsc::Sender<SpawnRequest>>>,
    /// Process group ids (equal to the leader's pid) of processes not yet reaped.
    live: Arc<Mutex<HashSet<i32>>>,
}

fn lock(live: &Mutex<HashSet<i32>>) -> MutexGuard<'_, HashSet<i32>> {
    live.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ProcessSupervisor {
    pub(super) fn new() -> io::Result<ProcessSupervisor> {
        let (requests, receiver) = std_mpsc::channel::<SpawnRequest>();
        let live = Arc::new(Mutex::new(HashSet::new()));
        let thread_live = live.clone();
        std::thread::Builder::new()
            .name("fakekube-spawner".to_string())
            .spawn(move || {
                while let Ok(request) = receiver.recv() {
                    let result = spawn_process(request.spec, &thread_live);
                    let _ = request.reply.send(result);
                }
            })?;
        Ok(ProcessSupervisor {
            requests: Mutex::new(Some(requests)),
            live,
        })
    }

    pub(super) async fn spawn(&self, spec: ProcessSpec) -> io::Result<RunningProcess> {
        let (reply, response) = oneshot::channel();
        let sender = self
            .requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let Some(sender) = sender else {
            return Err(io::Error::other(
                "the fake cluster is shutting down; no new pod processes start",
            ));
        };
        sender
            .send(SpawnRequest { spec, reply })
            .map_err(|_| io::Error::other("the pod process spawner thread has stopped"))?;
        response
            .await
            .map_err(|_| io::Error::other("the pod process spawner thread dropped the request"))?
    }

    /// Sends SIGKILL to every live process group and refuses new processes.
    pub(super) fn kill_all_now(&self) {
        self.requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        for pgid in lock(&self.live).iter() {
            signal_group(*pgid, libc::SIGKILL);
        }
    }

    /// Kills every process and waits until all are reaped or `timeout` passes.
    pub(super) async fn kill_all_and_wait(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.kill_all_now();
            let remaining = lock(&self.live).len();
            if remaining == 0 {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    remaining,
                    "pod processes still running after SIGKILL and {timeout:?}"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ProcessSupervisor {
    fn drop(&mut self) {
        self.kill_all_now();
    }
}

/// Sends `signal` to every process in the group.
pub(super) fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions, and a stale group id only yields ESRCH.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

fn spawn_process(spec: ProcessSpec, live: &Arc<Mutex<HashSet<i32>>>) -> io::Result<RunningProcess> {
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(spec.env.iter().cloned())
        .stdin(Stdio::null());
    match &spec.log_path {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|error| {
                    io::Error::new(
                        error.kind(),
                        format!("opening pod log file {} failed: {error}", path.display()),
                    )
                })?;
            command.stdout(file.try_clone()?).stderr(file);
        }
        None => {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    command.process_group(0);
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("starting {} failed: {error}", spec.program.display()),
        )
    })?;
    let pid = child.id() as i32;
    lock(live).insert(pid);

    let (exit_sender, exit) = oneshot::channel();
    let live = live.clone();
    std::thread::Builder::new()
        .name(format!("fakekube-wait-{pid}"))
        .spawn(move || {
            wait_for_exit_without_reaping(pid);
            // The leader is a zombie now, so its pid (and group id) cannot be reused
            // yet: kill what is left of the group, as a container runtime does when
            // the main process exits.
            signal_group(pid, libc::SIGKILL);
            let status = child.wait().unwrap_or_else(|error| {
                tracing::warn!(pid, %error, "waiting for pod process failed");
                ExitStatus::from_raw(0)
            });
            lock(&live).remove(&pid);
            let _ = exit_sender.send(status);
        })?;
    Ok(RunningProcess { pid, exit })
}

fn wait_for_exit_without_reaping(pid: i32) {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t.
        let result = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if result == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}
