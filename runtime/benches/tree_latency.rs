//! Benchmark (not a test): latency of an identity update of a process
//! tree against its number of processes (1, 2, 4, 8, 16), each of 4 threads,
//! with its breakdown by phase summed over the processes (they are stopped,
//! loaded, computed and committed one after the other, so each also waits
//! for the others: its own phase).
//!
//! `cargo bench -p upstare-runtime --bench tree_latency`. Needs gcc.

use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_runtime::update::tree::apply_tree;
use upstare_runtime::update::ApplyOptions;
use upstare_testkit::{compile_c, instrument, spawn, CSource, Toolchain};

/// `argv[1]` processes (the first and its children), each with 4 threads
/// idling in a nanosleep loop; prints `ready` once all are forked.
const SUBJECT: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long idle(long id)
{
    long n = 0;
    for (;;) {
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
        n += id;
    }
    return n;
}

static void *worker(void *arg)
{
    idle((long)arg);
    return NULL;
}

static void run(void)
{
    pthread_t t[3];
    for (long i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, worker, (void *)(i + 1));
    idle(0);
}

int main(int argc, char **argv)
{
    int procs = atoi(argv[1]);
    for (int i = 1; i < procs; i++)
        if (fork() == 0)
            run();
    printf("ready\n");
    fflush(stdout);
    run();
    return 0;
}
"#;

/// Updates per row; the medians are reported.
const RUNS: usize = 5;

/// One tree update's phases, in ms (summed over the processes).
#[derive(Clone, Copy, Default)]
struct Sample {
    stop: f64,
    load: f64,
    state: f64,
    commit: f64,
    /// Waiting for the other processes (summed).
    wait: f64,
    /// The longest pause of one process.
    pause: f64,
    total: f64,
}

fn median(samples: &[Sample], f: fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn latency(up: &Path, dir: &Path, procs: usize) -> Vec<Sample> {
    let child = spawn(up, &[procs.to_string()]).expect("spawn");
    child
        .wait_for_line("ready", Duration::from_secs(20), |l| l == "ready")
        .expect("ready");
    std::thread::sleep(Duration::from_millis(200));
    let mut out = Vec::new();
    let mut copies = Vec::new();
    for i in 0..RUNS {
        // A fresh copy per update: NEW must be another file than any mapped.
        let to = dir.join(format!("tree{procs}-copy{i}.up"));
        std::fs::copy(up, &to).expect("copy");
        let opts = ApplyOptions {
            timeout: Duration::from_secs(10),
            ..ApplyOptions::default()
        };
        let r = apply_tree(child.pid() as i32, &to, &opts)
            .unwrap_or_else(|e| panic!("update of {procs} processes: {e}"));
        assert_eq!(r.processes.len(), procs, "every process updated");
        let ms = |us: u64| us as f64 / 1000.0;
        let sum = |f: fn(&upstare_runtime::update::Timings) -> u64| {
            ms(r.processes.iter().map(|p| f(&p.timings)).sum())
        };
        out.push(Sample {
            stop: sum(|t| t.stop_us),
            load: sum(|t| t.load_us),
            state: sum(|t| t.check_us + t.transfer_us + t.rebuild_us + t.transform_us + t.sweep_us),
            commit: sum(|t| t.commit_us + t.resume_us),
            wait: sum(|t| t.tree_wait_us),
            pause: ms(r
                .processes
                .iter()
                .map(|p| p.timings.pause_us)
                .max()
                .unwrap_or(0)),
            total: ms(r.total_us),
        });
        // Kept until the end: the next update reads the running one.
        copies.push(to);
    }
    drop(child);
    for c in copies {
        let _ = std::fs::remove_file(c);
    }
    out
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-tree");
    std::fs::create_dir_all(&dir).expect("dir");
    let bin = compile_c(
        CSource::Text(SUBJECT),
        Toolchain::Gcc,
        &[],
        &dir.join("tree"),
    )
    .expect("compile");
    let up = dir.join("tree.up");
    instrument(&bin, &up);
    println!(
        "identity update of a process tree, 4 threads per process, ms, median of {RUNS};\n\
         stop / load / state / commit / waiting for the others summed over the processes;\n\
         pause = the longest pause of one process; total = whole update"
    );
    println!(
        "{:>9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8}",
        "processes", "stop", "load", "state", "commit", "wait", "pause", "total"
    );
    for procs in [1usize, 2, 4, 8, 16] {
        let s = latency(&up, &dir, procs);
        println!(
            "{:>9} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>8.2} {:>8.2}",
            procs,
            median(&s, |s| s.stop),
            median(&s, |s| s.load),
            median(&s, |s| s.state),
            median(&s, |s| s.commit),
            median(&s, |s| s.wait),
            median(&s, |s| s.pause),
            median(&s, |s| s.total)
        );
    }
}
