//! Fills a data directory with deliveries through the library's `SledStore` API (the same writer,
//! group commit and fsync as the service, without HTTP), for the start-up and GET scenarios.
//! The service must not be running on that directory.
//!
//! Controlids are `{prefix}{i:012}` for `i` in `0..count`, posted to `--policy`; bodies are
//! `mkbody` documents of `--size` bytes. Prints one JSON object: how many, how long, the rate.
//!
//! It resumes: on a directory that already holds `n` deliveries it starts at `n - 2 * concurrency`
//! (puts that were stored already come back `Duplicate`). A watchdog exits with status 3 when no
//! put has completed for `--stall-seconds` (default 60): sled 0.34.7 can deadlock under sustained
//! writes (see bench/BENCHMARKS.md), and bench/run then runs `populate` again.
//!
//! `populate --dir DIR --count 1000000 [--size 2048] [--prefix pop-] [--policy bench] [--concurrency 512]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use callback_receiver::store::{NewDelivery, PutOutcome, SledOptions, SledStore, Store};
use callback_receiver_bench::{body, die, Args};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

fn main() {
    let args = Args::parse();
    let dir = std::path::PathBuf::from(args.req("dir"));
    let count: u64 = args.num("count", 1_000_000);
    let size: usize = args.num("size", 2048);
    let prefix = args.get("prefix", "pop-");
    let policy = args.get("policy", "bench");
    let concurrency: usize = args.num("concurrency", 512);
    let stall: u64 = args.num("stall-seconds", 60);

    // Completed puts; the watchdog exits when it stops moving.
    let done = Arc::new(AtomicU64::new(0));
    let watched = done.clone();
    std::thread::spawn(move || {
        let mut last = (0, Instant::now());
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = watched.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed().as_secs() >= stall {
                eprintln!("populate: stalled: no put completed for {stall} s (the store is stuck)");
                std::process::exit(3);
            }
        }
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(&e.to_string()));
    runtime.block_on(async move {
        let started = Instant::now();
        let store = SledStore::open(&dir, SledOptions::default())
            .unwrap_or_else(|e| die(&format!("opening {dir:?}: {e}")));
        let store = Arc::new(store);
        let opened = started.elapsed().as_secs_f64();
        let first = store
            .delivery_count()
            .saturating_sub(2 * concurrency as u64)
            .min(count);
        if first > 0 {
            eprintln!(
                "populate: {} deliveries already stored; resuming at {first}",
                store.delivery_count()
            );
        }
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        let mut stored = 0u64;
        let mut last_report = Instant::now();
        for i in first..count {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .unwrap_or_else(|e| die(&e.to_string()));
            let store = store.clone();
            let controlid = format!("{prefix}{i:012}");
            let policy = policy.clone();
            let done = done.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let body = Bytes::from(body(size, &controlid));
                let extracted = callback_receiver::xml::extract(&body)
                    .unwrap_or_else(|e| die(&format!("bench body does not parse: {e}")));
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                let delivery = NewDelivery {
                    policy,
                    received_at_ms: now_ms,
                    sha256: Sha256::digest(&body).into(),
                    body,
                    extracted,
                };
                let outcome = store.put(delivery).await;
                done.fetch_add(1, Ordering::Relaxed);
                match outcome {
                    Ok(PutOutcome::Stored(_)) => 1u64,
                    Ok(PutOutcome::Duplicate(_)) => 0,
                    Err(e) => die(&format!("put: {e}")),
                }
            });
            while let Some(done) = tasks.try_join_next() {
                stored += done.unwrap_or_else(|e| die(&e.to_string()));
            }
            if last_report.elapsed().as_secs() >= 10 {
                last_report = Instant::now();
                eprintln!(
                    "populate: {i}/{count} after {:.0} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        while let Some(done) = tasks.join_next().await {
            stored += done.unwrap_or_else(|e| die(&e.to_string()));
        }
        store
            .close()
            .await
            .unwrap_or_else(|e| die(&format!("close: {e}")));
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "count": count,
                "resumed_at": first,
                "stored": stored,
                "size": size,
                "open_seconds": opened,
                "seconds": seconds,
                "per_second": stored as f64 / seconds,
                "flushes": store.flush_count(),
                "bytes_on_disk": store.size_on_disk(),
            })
        );
    });
}
