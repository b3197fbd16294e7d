//! Long-poll wake-up latency with many pollers waiting.
//!
//! Opens `--conns` HTTP/2 connections and starts `--pollers` requests
//! `GET /v1/responses/{prefix}{i}?wait=S` spread over them, waits `--settle` seconds so that
//! every poller is parked, then posts the matching callbacks one by one on a separate HTTP/1.1
//! connection. For each callback it takes three timestamps: the POST sent (t0), its `200`
//! received (t1), and the waiting poller's complete answer received (t2), and waits for t2
//! before posting the next callback. Wake-up latency is `t2 - t1`, counted as 0 when the poller's
//! answer arrived first (the server wakes pollers before it answers the callback).
//! Prints one JSON object with the percentiles in milliseconds.
//!
//! `longpoll --addr 127.0.0.1:18443 --ca ca.pem --token T --user U --password P --policy bench
//!  [--pollers 1000] [--conns 20] [--wait 60] [--settle 3] [--size 4096] [--prefix lp-]`

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callback_receiver_bench::{body, client_config, die, quantile, Args};
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

async fn connect(addr: SocketAddr, connector: &TlsConnector) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| die(&format!("connect {addr}: {e}")));
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("localhost").unwrap_or_else(|e| die(&e.to_string()));
    connector
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| die(&format!("tls: {e}")))
}

fn basic(user: &str, password: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}").into_bytes();
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

fn main() {
    let args = Args::parse();
    let addr: SocketAddr = args
        .req("addr")
        .parse()
        .unwrap_or_else(|e| die(&format!("--addr: {e}")));
    let ca = std::path::PathBuf::from(args.req("ca"));
    let token = args.req("token");
    let authorization = basic(&args.req("user"), &args.req("password"));
    let policy = args.get("policy", "bench");
    let pollers: usize = args.num("pollers", 1000);
    let conns: usize = args.num("conns", 20);
    let wait: u64 = args.num("wait", 60);
    let settle: f64 = args.num("settle", 3.0);
    let size: usize = args.num("size", 4096);
    let prefix = args.get("prefix", "lp-");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(&e.to_string()));
    runtime.block_on(async move {
        let h2 = TlsConnector::from(client_config(&ca, &[b"h2"]));
        let h1 = TlsConnector::from(client_config(&ca, &[b"http/1.1"]));

        let mut senders = Vec::new();
        for _ in 0..conns.max(1) {
            let tls = connect(addr, &h2).await;
            let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
                TokioExecutor::new(),
                TokioIo::new(tls),
            )
            .await
            .unwrap_or_else(|e| die(&format!("h2 handshake: {e}")));
            tokio::spawn(conn);
            senders.push(send);
        }

        // t2 of each poller, by index; a poller that fails reports its status instead.
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, Instant, u16)>();
        for i in 0..pollers {
            let mut send = senders[i % senders.len()].clone();
            let done = done_tx.clone();
            let uri = format!("https://localhost/v1/responses/{prefix}{i:08}?wait={wait}");
            let auth = format!("Bearer {token}");
            tokio::spawn(async move {
                let req = Request::get(uri)
                    .header("authorization", auth)
                    .body(Empty::new())
                    .unwrap_or_else(|e| die(&e.to_string()));
                let status = match send.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let _ = resp.into_body().collect().await;
                        status
                    }
                    Err(_) => 599,
                };
                let _ = done.send((i, Instant::now(), status));
            });
        }
        drop(done_tx);
        tokio::time::sleep(Duration::from_secs_f64(settle)).await;
        if let Ok((i, _, status)) = done_rx.try_recv() {
            die(&format!(
                "poller {i} answered {status} before its callback was posted"
            ));
        }

        let tls = connect(addr, &h1).await;
        let (mut post, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls))
                .await
                .unwrap_or_else(|e| die(&format!("h1 handshake: {e}")));
        tokio::spawn(conn);

        let mut early: HashMap<usize, Instant> = HashMap::new();
        let mut wake_ms = Vec::with_capacity(pollers);
        let mut from_post_ms = Vec::with_capacity(pollers);
        let mut post_ms = Vec::with_capacity(pollers);
        let mut before_200 = 0usize;
        for i in 0..pollers {
            let cid = format!("{prefix}{i:08}");
            let req = Request::post(format!("/callback/{policy}"))
                .header("host", "localhost")
                .header("authorization", &authorization)
                .header("content-type", "application/xml")
                .body(Full::new(Bytes::from(body(size, &cid))))
                .unwrap_or_else(|e| die(&e.to_string()));
            post.ready()
                .await
                .unwrap_or_else(|e| die(&format!("post connection: {e}")));
            let t0 = Instant::now();
            let resp = post
                .send_request(req)
                .await
                .unwrap_or_else(|e| die(&format!("post: {e}")));
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            let t1 = Instant::now();
            if status != 200 {
                die(&format!("callback {cid} answered {status}"));
            }
            let t2 = loop {
                if let Some(t) = early.remove(&i) {
                    break t;
                }
                match tokio::time::timeout(Duration::from_secs(10), done_rx.recv()).await {
                    Ok(Some((j, t, 200))) => {
                        early.insert(j, t);
                    }
                    Ok(Some((j, _, status))) => die(&format!("poller {j} answered {status}")),
                    Ok(None) | Err(_) => die(&format!("poller {i} was not woken within 10 s")),
                }
            };
            if t2 < t1 {
                before_200 += 1;
            }
            wake_ms.push(t2.saturating_duration_since(t1).as_secs_f64() * 1000.0);
            from_post_ms.push(t2.saturating_duration_since(t0).as_secs_f64() * 1000.0);
            post_ms.push((t1 - t0).as_secs_f64() * 1000.0);
        }
        for v in [&mut wake_ms, &mut from_post_ms, &mut post_ms] {
            v.sort_by(f64::total_cmp);
        }
        println!(
            "{}",
            serde_json::json!({
                "pollers": pollers,
                "conns": conns,
                "p50_ms": quantile(&wake_ms, 0.5),
                "p99_ms": quantile(&wake_ms, 0.99),
                "max_ms": quantile(&wake_ms, 1.0),
                "answered_before_200": before_200,
                "from_post_p50_ms": quantile(&from_post_ms, 0.5),
                "from_post_p99_ms": quantile(&from_post_ms, 0.99),
                "post_p50_ms": quantile(&post_ms, 0.5),
                "post_p99_ms": quantile(&post_ms, 0.99),
            })
        );
        std::process::exit(0);
    });
}
