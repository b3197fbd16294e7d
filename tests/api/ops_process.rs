//! The harness of the operations tests: the real binary as a subprocess, with a configuration
//! file, and a datagram socket standing in for systemd's `NOTIFY_SOCKET`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_callback-receiver");

/// How long the tests wait for something the service should do at once.
pub const WAIT: Duration = Duration::from_secs(15);

/// A command for the binary with a predictable environment.
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("CALLBACK_RECEIVER_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE");
    cmd
}

/// A datagram socket that records what the service sends to `NOTIFY_SOCKET`.
pub struct NotifySocket {
    /// Its path.
    pub path: PathBuf,
    /// Every datagram so far, with the time it arrived.
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
    /// Tells the reader thread to stop.
    stop: Arc<AtomicBool>,
}

impl NotifySocket {
    /// Binds `dir/notify.sock` and starts reading it.
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let messages = messages.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        if let Ok(mut m) = messages.lock() {
                            m.push((Instant::now(), text));
                        }
                    }
                }
            });
        }
        Self {
            path,
            messages,
            stop,
        }
    }

    /// Every datagram so far.
    pub fn messages(&self) -> Vec<(Instant, String)> {
        match self.messages.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The arrival times of the datagrams that hold the line `state` (e.g. `READY=1`).
    pub fn times_of(&self, state: &str) -> Vec<Instant> {
        self.messages()
            .into_iter()
            .filter(|(_, m)| m.lines().any(|l| l == state))
            .map(|(t, _)| t)
            .collect()
    }

    /// Waits until `state` has been received `count` times; returns the time of the last one.
    pub fn wait_for(&self, state: &str, count: usize) -> Instant {
        let deadline = Instant::now() + WAIT;
        loop {
            let times = self.times_of(state);
            if times.len() >= count {
                return times[count - 1];
            }
            assert!(
                Instant::now() < deadline,
                "no {state} number {count} within {WAIT:?}; received {:?}",
                self.messages()
                    .into_iter()
                    .map(|(_, m)| m)
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A running `serve` process, killed if the test ends before it exits.
pub struct Process {
    /// The process.
    child: Child,
    /// Its stderr lines so far.
    stderr: Arc<Mutex<Vec<String>>>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The address in a `listening` log line, JSON or text.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        if v["message"].as_str() == Some("listening") {
            return v["addr"].as_str()?.parse().ok();
        }
        return None;
    }
    if !line.contains("listening") {
        return None;
    }
    let rest = &line[line.find("addr=")? + 5..];
    rest.split_whitespace().next()?.parse().ok()
}

impl Process {
    /// Starts `serve --config CONFIG` with `env` and waits for its `listening` line.
    pub fn serve(config: &Path, env: &[(&str, &str)]) -> Process {
        let mut cmd = command(&["serve", "--config", &config.display().to_string()]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start serve");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("stderr");
        {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if std::env::var_os("TEST_LOG").is_some() {
                        eprintln!("[serve] {line}");
                    }
                    if let Ok(mut s) = stderr.lock() {
                        s.push(line);
                    }
                }
            });
        }
        let mut process = Process {
            child,
            stderr,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let line = process.wait_for_log(|l| listening_addr(l).is_some());
        process.addr = listening_addr(&line).expect("address");
        process
    }

    /// Every stderr line so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        match self.stderr.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Waits for a stderr line that satisfies `pred`; returns it.
    pub fn wait_for_log(&mut self, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_log_after(0, pred)
    }

    /// Like [`Process::wait_for_log`], looking only at lines after the first `skip`.
    pub fn wait_for_log_after(&mut self, skip: usize, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.stderr_lines().into_iter().skip(skip).find(|l| pred(l)) {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader thread catch the last lines.
                std::thread::sleep(Duration::from_millis(100));
                if let Some(line) = self.stderr_lines().into_iter().skip(skip).find(|l| pred(l)) {
                    return line;
                }
                panic!(
                    "the service exited ({status}) before the expected log line; stderr:\n{}",
                    self.stderr_lines().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "the expected log line did not come within {WAIT:?}; stderr:\n{}",
                self.stderr_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal (`HUP`, `TERM`, ...) with `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits (up to 30 s) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running 30 s later; stderr:\n{}",
                self.stderr_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
