//! The cost of making 4 KB durable on a file system: `--count` times, append `--size` bytes to a
//! file in `--dir` and `fdatasync` it (as a log does), then the same overwriting one block in
//! place. Prints one JSON object with the percentiles in milliseconds.
//!
//! `fsync-probe --dir DIR [--count 1000] [--size 4096]`

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::time::Instant;

use callback_receiver_bench::{die, quantile, Args};

fn main() {
    let args = Args::parse();
    let dir = std::path::PathBuf::from(args.req("dir"));
    let count: usize = args.num("count", 1000);
    let size: usize = args.num("size", 4096);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(&format!("{dir:?}: {e}")));
    let path = dir.join("fsync-probe.tmp");
    let block = vec![b'x'; size];

    let run = |append: bool| -> Vec<f64> {
        let _ = std::fs::remove_file(&path);
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap_or_else(|e| die(&format!("{path:?}: {e}")));
        if !append {
            file.write_all(&block)
                .unwrap_or_else(|e| die(&e.to_string()));
            file.sync_all().unwrap_or_else(|e| die(&e.to_string()));
        }
        let mut times = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            if !append {
                file.seek(SeekFrom::Start(0))
                    .unwrap_or_else(|e| die(&e.to_string()));
            }
            file.write_all(&block)
                .unwrap_or_else(|e| die(&e.to_string()));
            file.sync_data().unwrap_or_else(|e| die(&e.to_string()));
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        times
    };
    let appended = run(true);
    let overwritten = run(false);
    let _ = std::fs::remove_file(&path);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "count": count,
            "size": size,
            "append_p50_ms": quantile(&appended, 0.5),
            "append_p99_ms": quantile(&appended, 0.99),
            "append_mean_ms": mean(&appended),
            "overwrite_p50_ms": quantile(&overwritten, 0.5),
            "overwrite_p99_ms": quantile(&overwritten, 0.99),
        })
    );
}
