//! Benchmarks (not tests):
//! 1. update latency of an identity update against stack depth (1-1,000
//!    frames) and thread count (1-64), with its breakdown by phase;
//! 2. steady-state cost of an instrumented binary against the original:
//!    callgrind instruction counts and wall time, measured in the same run.
//!
//! `cargo bench -p upstare-runtime --bench update_latency`. Needs gcc and
//! valgrind (scripts/deps installs both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use upstare_corpus::{build, program};
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_c, instrument, spawn, CSource, Toolchain};

const SUBJECT: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile int running = 1;

static long idle(int id)
{
    long n = 0;
    while (running) {
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
        n += id;
    }
    return n;
}

static long descend(int depth, int id)
{
    long here = depth * 3 + id;
    if (depth == 0)
        return idle(id);
    return descend(depth - 1, id) + here;
}

static int depth;

static void *worker(void *arg)
{
    descend(depth, (int)(long)arg);
    return NULL;
}

int main(int argc, char **argv)
{
    depth = atoi(argv[1]);
    int threads = atoi(argv[2]);
    pthread_t tids[64];
    for (int i = 1; i < threads && i < 64; i++)
        pthread_create(&tids[i], NULL, worker, (void *)(long)i);
    printf("ready\n");
    fflush(stdout);
    return (int)descend(depth, 0);
}
"#;

struct Sample {
    stop: f64,
    load: f64,
    state: f64,
    total: f64,
}

/// Median-of-`n` identity updates of one process with `depth` frames per
/// thread and `threads` threads.
fn latency(up: &Path, copies: &[PathBuf], depth: usize, threads: usize) -> Sample {
    let child = spawn(up, &[depth.to_string(), threads.to_string()]).expect("spawn");
    child
        .wait_for_line("ready", Duration::from_secs(20), |l| l == "ready")
        .expect("ready");
    std::thread::sleep(Duration::from_millis(50));
    let opts = ApplyOptions {
        timeout: Duration::from_secs(5),
        ..ApplyOptions::default()
    };
    let mut samples = Vec::new();
    for to in copies {
        let r = apply(child.pid() as i32, to, &opts).unwrap_or_else(|e| panic!("update: {e}"));
        let t = &r.timings;
        let ms = |us: u64| us as f64 / 1000.0;
        samples.push(Sample {
            stop: ms(t.stop_us),
            load: ms(t.load_us),
            state: ms(t.save_us + t.transfer_us + t.rebuild_us),
            total: ms(t.total_us),
        });
    }
    samples.sort_by(|a, b| a.total.total_cmp(&b.total));
    samples.swap_remove(samples.len() / 2)
}

fn callgrind(bin: &Path) -> Option<u64> {
    let out = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(bin)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse().ok())
}

fn wall(bin: &Path, runs: usize) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            let s = Command::new(bin).output().expect("run");
            assert!(s.status.success() || s.status.code().is_some());
            t.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-update");
    std::fs::create_dir_all(&dir).expect("dir");
    let bin = compile_c(
        CSource::Text(SUBJECT),
        Toolchain::Gcc,
        &[],
        &dir.join("subject"),
    )
    .expect("compile");
    let up = dir.join("subject.up");
    instrument(&bin, &up);
    let copies: Vec<PathBuf> = (0..3)
        .map(|i| {
            let c = dir.join(format!("subject-copy{i}.up"));
            std::fs::copy(&up, &c).expect("copy");
            c
        })
        .collect();

    println!("identity update latency (median of 3 updates of one process), ms");
    println!(
        "{:>7} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "frames", "threads", "stop", "load", "state", "total"
    );
    let mut rows = Vec::new();
    for depth in [1usize, 10, 100, 1000] {
        rows.push((depth, 1usize));
    }
    for threads in [4usize, 16, 64] {
        rows.push((10, threads));
    }
    for (depth, threads) in rows {
        let s = latency(&up, &copies, depth, threads);
        println!(
            "{:>7} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            depth + 3,
            threads,
            s.stop,
            s.load,
            s.state,
            s.total
        );
    }

    println!("\nsteady-state cost: instrumented vs original (same run)");
    println!(
        "{:>10} {:>16} {:>16} {:>8} {:>10} {:>10} {:>8}",
        "program", "instr orig", "instr .up", "ratio", "ms orig", "ms .up", "ratio"
    );
    for name in ["scoring", "matrix", "calc", "kvstore"] {
        let p = program(name).expect("corpus program");
        let orig = build(&p, Toolchain::Gcc).expect("build");
        let inst = dir.join(format!("{name}.up"));
        instrument(&orig, &inst);
        let (a, b) = (callgrind(&orig), callgrind(&inst));
        let (wa, wb) = (wall(&orig, 15), wall(&inst, 15));
        let ratio = match (a, b) {
            (Some(a), Some(b)) if a > 0 => format!("{:.4}", b as f64 / a as f64),
            _ => "n/a".into(),
        };
        println!(
            "{:>10} {:>16} {:>16} {:>8} {:>10.2} {:>10.2} {:>8.3}",
            name,
            a.map_or("n/a".into(), |v| v.to_string()),
            b.map_or("n/a".into(), |v| v.to_string()),
            ratio,
            wa,
            wb,
            wb / wa
        );
    }
}
