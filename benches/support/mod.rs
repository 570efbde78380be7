//! Helpers shared by the benchmarks: starting coldgate, nginx and wrk, reading process
//! figures from /proc, and small blocking HTTP calls. Everything talks to loopback only.
//!
//! Each benchmark includes this file with `#[path = "support/mod.rs"] mod support;`, so a
//! helper that one benchmark does not use is not dead code.
#![allow(dead_code)]

pub mod backend;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const COLDGATE: &str = env!("CARGO_BIN_EXE_coldgate");

/// Returns the coldgate binary the benchmarks start: `COLDGATE_BENCH_BIN` when set (to
/// compare two builds with the same benchmark), else the one cargo built for this run,
/// which is the release build under `cargo bench` and the debug build under `cargo test`.
pub fn coldgate_bin() -> String {
    std::env::var("COLDGATE_BENCH_BIN").unwrap_or_else(|_| COLDGATE.to_string())
}

/// Returns true under `cargo bench`, which passes `--bench`. `cargo test --all-targets`
/// runs the benchmarks without it, and then they run as short smoke tests.
pub fn benchmarking() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// Returns the value after `--NAME` on the command line, parsed, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let flag = format!("--{name}");
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|arg| *arg == flag) {
        None => default,
        Some(index) => {
            let value = args.get(index + 1).unwrap_or_else(|| panic!("{flag} expects a value"));
            value
                .parse()
                .unwrap_or_else(|_| panic!("invalid value {value:?} for {flag}"))
        }
    }
}

/// Returns true when `--NAME` is on the command line.
pub fn flag(name: &str) -> bool {
    let flag = format!("--{name}");
    std::env::args().any(|arg| arg == flag)
}

/// Raises the soft limit of open files to the hard limit, for benchmarks that open
/// thousands of client sockets. Returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            panic!("getrlimit(RLIMIT_NOFILE) failed: {}", std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                panic!("setrlimit(RLIMIT_NOFILE) failed: {}", std::io::Error::last_os_error());
            }
        }
    }
    limit.rlim_cur
}

pub fn unix_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// Returns a loopback port that was free a moment ago. Another process may take it before
/// the caller binds it, so a caller that passes it to a server must retry with a new port
/// when the server fails to start.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Returns the path of `program` in PATH, or None.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Resident memory of a process in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// CPU time (user plus system) a process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ')'.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_nanos(ticks * clock_tick().as_nanos() as u64)
}

/// Returns the length of one clock tick, the unit of CPU times in /proc.
pub fn clock_tick() -> Duration {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_nanos(1_000_000_000 / per_second)
}

/// CPU time of a process plus its direct children (nginx's master and workers).
pub fn cpu_time_with_children(pid: u32) -> Duration {
    let mut total = cpu_time(pid);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if parent == Some(pid) {
            total += cpu_time(child);
        }
    }
    total
}

/// Returns the value at quantile `q` (0.0 to 1.0) of sorted samples, nearest rank.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> T {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Returns the median: the middle value, or the mean of the two middle values.
pub fn median_f64(values: &[f64]) -> f64 {
    assert!(!values.is_empty(), "median of no values");
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

/// Formats the median of `values` with `decimals` digits, followed by the range over the
/// values in brackets when there is more than one, so that readers can see the noise.
pub fn median_with_range(values: &[f64], decimals: usize) -> String {
    let median = median_f64(values);
    if values.len() < 2 {
        return format!("{median:.decimals$}");
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{median:.decimals$} ({min:.decimals$}-{max:.decimals$})")
}

/// Makes the kernel send SIGTERM to the spawned process when the thread that spawns it
/// exits, so that a benchmark killed by a signal or by a panic that does not unwind
/// leaves no coldgate, nginx or wrk behind. Call this from the main thread: the signal
/// is tied to the spawning thread, not to the whole benchmark process.
pub fn terminate_with_parent(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe, and reads errno through last_os_error.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Returns the kernel's `ListenOverflows` counter from /proc/net/netstat: connections
/// dropped because a listening socket's accept queue was full. The counter covers the
/// whole network namespace, not one process. Returns None where the file is missing.
pub fn listen_overflows() -> Option<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    // The file has pairs of lines: "TcpExt: NAME NAME ..." then "TcpExt: VALUE VALUE ...".
    let mut tcp_ext = netstat.lines().filter(|line| line.starts_with("TcpExt:"));
    let names = tcp_ext.next()?;
    let values = tcp_ext.next()?;
    let index = names.split_whitespace().position(|name| name == "ListenOverflows")?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// A blocking HTTP/1.1 exchange with `Connection: close`. Returns the status code and body.
pub fn http_request(addr: SocketAddr, method: &str, host: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    parse_response(&response)
}

pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    http_request(addr, "GET", host, path, b"")
}

/// Splits a whole `Connection: close` response into status and body. Chunked bodies are
/// returned as they came, with their chunk framing.
pub fn parse_response(response: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("invalid HTTP response: {what}"));
    let status = response
        .get(9..12)
        .and_then(|code| std::str::from_utf8(code).ok())
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| invalid("no status line"))?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no end of headers"))?;
    Ok((status, response[split + 4..].to_vec()))
}

/// Fetches and parses coldgate's `/status`.
pub fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(admin, "admin", "/status").expect("GET /status");
    assert_eq!(code, 200, "GET /status returned {code}");
    serde_json::from_slice(&body).expect("/status returns JSON")
}

/// Returns the value of an unlabelled or fully labelled sample in coldgate's `/metrics`,
/// summed over every line that starts with `prefix` (a name, optionally with labels).
pub fn metric_sum(admin: SocketAddr, prefix: &str) -> f64 {
    let (code, body) = http_get(admin, "admin", "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "GET /metrics returned {code}");
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, value)| value.parse::<f64>().ok()))
        .sum()
}

/// How long [`Coldgate::start`] waits for the "listening" line. coldgate with 10,000
/// services has taken about 10 s on a 2-CPU VM, so this leaves a wide margin.
const LISTENING_TIMEOUT: Duration = Duration::from_secs(120);

/// A running coldgate, stopped with SIGTERM when dropped. Under `cargo bench` it is the
/// release build, under `cargo test` the debug build.
pub struct Coldgate {
    child: Child,
    pub pid: u32,
    pub data: SocketAddr,
    pub admin: SocketAddr,
    /// Time from spawning the process to reading its "listening" log line.
    pub listening_after: Duration,
}

impl Coldgate {
    /// Starts `coldgate serve --config PATH` with JSON logs and waits for its "listening"
    /// line, which carries the bound addresses. The config should listen on port 0.
    pub fn start(config: &Path) -> Coldgate {
        Self::start_with(config, &[])
    }

    /// Like [`Coldgate::start`], with extra `taskset`-style prefix arguments, for example
    /// `["taskset", "-c", "1"]` to pin coldgate to CPU 1.
    pub fn start_with(config: &Path, prefix: &[&str]) -> Coldgate {
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(coldgate_bin());
                command
            }
            None => Command::new(coldgate_bin()),
        };
        command
            .args(["serve", "--config"])
            .arg(config)
            .args(["--log-format", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        terminate_with_parent(&mut command);
        let spawned = Instant::now();
        let mut child = command.spawn().expect("failed to start coldgate");
        let pid = child.id();

        // A thread reads the log, so that the wait below can time out, and keeps draining
        // it afterwards, so that coldgate never blocks on a full pipe. It prints WARN and
        // ERROR lines to stderr.
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sender = Some(sender);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addresses) = sender.as_ref().and_then(|_| parse_listening_line(&line)) {
                    let _ = sender.take().unwrap().send(addresses);
                    continue;
                }
                if line.contains("\"level\":\"ERROR\"") || line.contains("\"level\":\"WARN\"") {
                    eprintln!("coldgate: {line}");
                }
            }
        });

        let addresses = match receiver.recv_timeout(LISTENING_TIMEOUT) {
            Ok(addresses) => addresses,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The log closed, so coldgate has exited or is exiting. kill() makes sure
                // that wait() returns, and an exit status already reached is kept.
                let _ = child.kill();
                let status = child.wait();
                panic!("coldgate exited before its \"listening\" line ({status:?}); see its log above");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("coldgate printed no \"listening\" line within {LISTENING_TIMEOUT:?}; killed it");
            }
        };
        let listening_after = spawned.elapsed();
        let (data, admin) = addresses;
        Coldgate { child, pid, data, admin, listening_after }
    }

    /// Waits until the service at `index` in `/status` reports `state`, up to `limit`.
    pub fn wait_for_state(&self, index: usize, state: &str, limit: Duration) {
        let started = Instant::now();
        loop {
            let value = status(self.admin);
            if value["services"][index]["state"] == state {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "service {index} did not reach state {state:?} within {limit:?}; last status: {}",
                value["services"][index]
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends SIGTERM and waits up to 20 s, then SIGKILL.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("coldgate pid {} did not stop within 20 s of SIGTERM; killing it", self.pid);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Coldgate {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Returns the data and admin addresses from coldgate's JSON "listening" log line, or
/// None for any other line.
fn parse_listening_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let value = serde_json::from_str::<serde_json::Value>(line).ok()?;
    if value["fields"]["message"] != "listening" && value["message"] != "listening" {
        return None;
    }
    let field = |name: &str| {
        let text = value["fields"][name].as_str().or(value[name].as_str());
        text.unwrap_or_else(|| panic!("\"listening\" line without {name}: {line}"))
            .parse::<SocketAddr>()
            .unwrap_or_else(|e| panic!("invalid {name} in the \"listening\" line: {e}: {line}"))
    };
    Some((field("data_addr"), field("admin_addr")))
}

/// The common `[server]` table of the benchmark configs: loopback, port 0, quick drain.
pub fn server_table(threads: usize, max_total_queued: usize) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
threads = {threads}
max_total_queued = {max_total_queued}
drain_delay = "0s"
shutdown_grace = "5s"
"#
    )
}

/// Quotes a string as a TOML basic string.
pub fn toml_string(value: &str) -> String {
    serde_json::to_string(value).unwrap()
}

/// A running nginx with its own prefix and config, stopped with SIGTERM when dropped.
pub struct Nginx {
    child: Child,
    pub pid: u32,
}

/// Returns the nginx binary found in PATH. Debian installs it as /usr/sbin/nginx, which is
/// not in the PATH of every user; a PATH without it hides nginx from the benchmarks.
pub fn nginx_path() -> Option<PathBuf> {
    which("nginx")
}

impl Nginx {
    /// Starts nginx in the foreground on `config`, which must contain `daemon off;` and keep
    /// its pid file, logs and temp paths under `prefix`.
    pub fn start(config: &Path, prefix: &Path, pin: Option<&str>) -> Nginx {
        let nginx = nginx_path().expect("nginx not found in PATH; install it with scripts/bench-deps.sh or add /usr/sbin to PATH");
        let mut command = match pin {
            Some(cpus) => {
                let mut command = Command::new("taskset");
                command.args(["-c", cpus]).arg(nginx);
                command
            }
            None => Command::new(nginx),
        };
        // -e sets the error log before the config is read, so nginx never opens the
        // system's /var/log/nginx/error.log.
        command
            .arg("-p")
            .arg(prefix)
            .args(["-e", "stderr", "-c"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        terminate_with_parent(&mut command);
        let child = command.spawn().expect("failed to start nginx");
        let pid = child.id();
        Nginx { child, pid }
    }

    /// Waits up to 10 s until `addr` responds to `path` with 200 and `expected_body`. Returns an
    /// error when nginx exits first, for example because another process took its port.
    pub fn wait_ready(&mut self, addr: SocketAddr, path: &str, expected_body: &[u8]) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("nginx exited with {status} before answering on {addr}; see its log above"));
            }
            if let Ok((200, body)) = http_get(addr, "localhost", path) {
                if body == expected_body {
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!("nginx did not answer {path} on {addr} with the expected body within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Once reaped, the pid may belong to another process, so it must not be signalled.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child's.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Figures from one wrk run, taken from the line that [`WRK_SCRIPT`] prints.
#[derive(Debug, Clone, Copy, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub bytes: u64,
    /// Connect, read, write and timeout errors, and responses that were not 2xx or 3xx.
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl WrkResult {
    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    pub fn mib_per_second(&self) -> f64 {
        self.bytes as f64 / self.seconds / (1024.0 * 1024.0)
    }
}

/// wrk script whose `done` prints one machine-readable line, including p99.9, which wrk's
/// own `--latency` table leaves out. wrk reports latencies in microseconds.
pub const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d bytes=%d errors=%d p50=%d p99=%d p999=%d max=%d\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"#;

/// A wrk run: `threads` threads, `connections` keep-alive connections, for `seconds`.
pub struct Wrk<'a> {
    pub url: String,
    pub host: &'a str,
    pub threads: usize,
    pub connections: usize,
    pub seconds: u64,
    /// CPUs for `taskset -c`, or None for no pinning.
    pub pin: Option<&'a str>,
    pub script: &'a Path,
}

impl Wrk<'_> {
    pub fn run(&self) -> WrkResult {
        let mut command = match self.pin {
            Some(cpus) => {
                let mut command = Command::new("taskset");
                command.args(["-c", cpus, "wrk"]);
                command
            }
            None => Command::new("wrk"),
        };
        command
            .arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{}s", self.seconds))
            .args(["--timeout", "10s", "-H"])
            .arg(format!("Host: {}", self.host))
            .arg("-s")
            .arg(self.script)
            .arg(&self.url);
        terminate_with_parent(&mut command);
        let output = command.output().expect("failed to run wrk; install it with scripts/bench-deps.sh");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "wrk failed ({}): {stdout}{}", output.status, String::from_utf8_lossy(&output.stderr));
        let line = stdout
            .lines()
            .find_map(|line| line.strip_prefix("WRK_RESULT "))
            .unwrap_or_else(|| panic!("wrk printed no WRK_RESULT line: {stdout}"));
        let mut result = WrkResult::default();
        for pair in line.split_whitespace() {
            let (key, value) = pair.split_once('=').unwrap();
            let number: f64 = value.parse().unwrap();
            match key {
                "requests" => result.requests = number as u64,
                "duration_us" => result.seconds = number / 1e6,
                "bytes" => result.bytes = number as u64,
                "errors" => result.errors = number as u64,
                "p50" => result.p50_us = number,
                "p99" => result.p99_us = number,
                "p999" => result.p999_us = number,
                "max" => result.max_us = number,
                _ => {}
            }
        }
        result
    }
}

/// Machine summary for the benchmark output: CPU model, CPU count and kernel.
pub fn machine_summary() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cpus} CPUs, Linux {}", kernel.trim())
}
