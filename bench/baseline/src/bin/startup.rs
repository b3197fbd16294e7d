//! Start-up time and idle memory of a server: spawns the command after `--`, polls
//! `GET /healthz` over TLS every 2 ms until it answers `200` (start-up = spawn to that answer),
//! waits `--idle` seconds, reads `VmRSS` and `VmHWM` from `/proc/PID/status`, then stops the
//! server with SIGTERM. Prints one JSON object.
//!
//! `startup --addr 127.0.0.1:18443 --ca ca.pem [--idle 3] [--timeout 120] -- CMD ARGS...`

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use callback_receiver_bench::{client_config, die};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

async fn healthz(addr: SocketAddr, connector: &TlsConnector) -> bool {
    let Ok(tcp) = TcpStream::connect(addr).await else {
        return false;
    };
    let Ok(name) = ServerName::try_from("localhost") else {
        return false;
    };
    let Ok(tls) = connector.connect(name, tcp).await else {
        return false;
    };
    let Ok((mut send, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let Ok(req) = Request::get("/healthz")
        .header("host", "localhost")
        .body(Empty::new())
    else {
        return false;
    };
    match send.send_request(req).await {
        Ok(resp) => {
            let ok = resp.status() == 200;
            let _ = resp.into_body().collect().await;
            ok
        }
        Err(_) => false,
    }
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let split = all
        .iter()
        .position(|a| a == "--")
        .unwrap_or_else(|| die("usage: startup --addr A --ca F [--idle S] -- CMD ARGS..."));
    let (flags, command) = (&all[..split], &all[split + 1..]);
    let flag = |name: &str| {
        flags
            .iter()
            .position(|f| f == name)
            .and_then(|i| flags.get(i + 1).cloned())
    };
    let addr: SocketAddr = flag("--addr")
        .unwrap_or_else(|| die("--addr is required"))
        .parse()
        .unwrap_or_else(|e| die(&format!("--addr: {e}")));
    let ca = flag("--ca").unwrap_or_else(|| die("--ca is required"));
    let idle: f64 = flag("--idle").and_then(|v| v.parse().ok()).unwrap_or(3.0);
    let timeout: f64 = flag("--timeout").and_then(|v| v.parse().ok()).unwrap_or(120.0);
    if command.is_empty() {
        die("no command after --");
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(&e.to_string()));
    runtime.block_on(async move {
        let connector = TlsConnector::from(client_config(ca.as_ref(), &[b"http/1.1"]));
        let spawned = Instant::now();
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| die(&format!("spawning {}: {e}", command[0])));
        let pid = child.id();
        let startup = loop {
            if healthz(addr, &connector).await {
                break spawned.elapsed().as_secs_f64();
            }
            if let Ok(Some(status)) = child.try_wait() {
                die(&format!("the server exited during start-up: {status}"));
            }
            if spawned.elapsed().as_secs_f64() > timeout {
                let _ = child.kill();
                die("the server did not answer /healthz in time");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let (rss_at_ready, _) = memory(pid);
        tokio::time::sleep(Duration::from_secs_f64(idle)).await;
        let (rss, hwm) = memory(pid);
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let stopping = Instant::now();
        let stopped = loop {
            if let Ok(Some(_)) = child.try_wait() {
                break stopping.elapsed().as_secs_f64();
            }
            if stopping.elapsed().as_secs() > 60 {
                let _ = child.kill();
                let _ = child.wait();
                break f64::NAN;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        println!(
            "{}",
            serde_json::json!({
                "startup_s": startup,
                "rss_at_ready_kb": rss_at_ready,
                "idle_rss_kb": rss,
                "hwm_kb": hwm,
                "stop_s": stopped,
            })
        );
    });
}
