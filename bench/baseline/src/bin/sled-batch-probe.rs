//! Evidence for the ingest bottleneck: how fast sled 0.34 makes deliveries durable when each
//! delivery is its own `apply_batch` (what `SledStore`'s writer does) versus one `apply_batch`
//! per group, with one `flush` + `fdatasync` per group either way.
//!
//! Every delivery writes the same keys as `SledStore::put` (record, body, controlid index,
//! policy index, time index, two counters). sled's `apply_batch` rolls (seals and writes) the IO
//! buffer before and after its batch reservation (`sled::pagecache::PageCache::pin_log`), so a
//! batch per delivery turns every delivery into separate log writes, each followed by a
//! `sync_file_range(WAIT_AFTER)` on sled's IO threads.
//!
//! `sled-batch-probe --dir DIR [--count 10000] [--group 64] [--size 4096]`

use std::fs::OpenOptions;
use std::time::Instant;

use callback_receiver_bench::{body, die, Args};

fn run(dir: &std::path::Path, count: u64, group: u64, size: usize, per_delivery: bool) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(128 * 1024 * 1024)
        .open()
        .unwrap_or_else(|e| die(&e.to_string()));
    let log = OpenOptions::new()
        .write(true)
        .open(dir.join("db"))
        .unwrap_or_else(|e| die(&e.to_string()));
    let started = Instant::now();
    let mut id = 0u64;
    while id < count {
        let mut batch = sled::Batch::default();
        for _ in 0..group.min(count - id) {
            id += 1;
            let cid = format!("probe-{id:014}");
            let b = body(size, &cid);
            batch.insert([&b"m"[..], &id.to_be_bytes()].concat(), vec![1u8; 600]);
            batch.insert([&b"b"[..], &id.to_be_bytes()].concat(), b);
            batch.insert(
                [
                    &b"c"[..],
                    &(cid.len() as u32).to_be_bytes(),
                    cid.as_bytes(),
                    &id.to_be_bytes(),
                ]
                .concat(),
                vec![2u8; 45],
            );
            batch.insert(
                [&b"p\0\0\0\x05bench"[..], &id.to_be_bytes()].concat(),
                Vec::new(),
            );
            batch.insert(
                [&b"t"[..], &id.to_be_bytes(), &id.to_be_bytes()].concat(),
                vec![b'd'],
            );
            batch.insert(&b"s/next_id"[..], (id + 1).to_be_bytes().to_vec());
            batch.insert(&b"s/deliveries"[..], id.to_be_bytes().to_vec());
            if per_delivery {
                db.apply_batch(std::mem::take(&mut batch))
                    .unwrap_or_else(|e| die(&e.to_string()));
            }
        }
        if !per_delivery {
            db.apply_batch(batch)
                .unwrap_or_else(|e| die(&e.to_string()));
        }
        db.flush().unwrap_or_else(|e| die(&e.to_string()));
        log.sync_data().unwrap_or_else(|e| die(&e.to_string()));
    }
    count as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let args = Args::parse();
    let dir = std::path::PathBuf::from(args.req("dir"));
    let count: u64 = args.num("count", 10_000);
    let group: u64 = args.num("group", 64);
    let size: usize = args.num("size", 4096);
    let per_delivery = run(&dir, count, group, size, true);
    let per_group = run(&dir, count, group, size, false);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        serde_json::json!({
            "count": count,
            "group": group,
            "size": size,
            "batch_per_delivery_per_second": per_delivery,
            "batch_per_group_per_second": per_group,
        })
    );
}
