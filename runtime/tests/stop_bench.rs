//! Stop latency against stack depth and thread count (ignored by default;
//! run with `cargo test --release -p upstare-runtime --test stop_bench --
//! --ignored --nocapture`). Prints a table; asserts only that every thread
//! was stopped ready with the expected frames.

mod stop_support;

use std::time::Duration;
use stop_support::*;
use upstare_runtime::engine::state::Readiness;
use upstare_runtime::stop::{stop_the_world, StopOptions, StopTimings};
use upstare_testkit::Toolchain;

const BENCH: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

volatile int flag;
volatile long counter;
int depth;

int rec(int n)
{
    if (n <= 1) {
        while (!flag) {
            counter++;
        }
        return 1;
    }
    return rec(n - 1) + 1;
}

void *hot(void *a)
{
    return (void *)(long)rec(depth);
}

void *blocked(void *a)
{
    char c;
    long n = read(0, &c, 1);
    return (void *)n;
}

int main(int argc, char **argv)
{
    depth = atoi(argv[1]);
    int nhot = atoi(argv[2]);
    int nblocked = atoi(argv[3]);
    pthread_t t;
    for (int i = 0; i < nhot; i++)
        pthread_create(&t, 0, hot, 0);
    for (int i = 0; i < nblocked; i++)
        pthread_create(&t, 0, blocked, 0);
    printf("ready\n");
    fflush(stdout);
    char c;
    long n = read(0, &c, 1);
    return n == 1 ? 0 : 1;
}
"#;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Median timings of `runs` stops of `bench depth hot blocked`.
fn measure(exe: &std::path::Path, depth: usize, hot: usize, blocked: usize) -> Vec<StopTimings> {
    let mut out = Vec::new();
    for _ in 0..5 {
        let args = [depth.to_string(), hot.to_string(), blocked.to_string()];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = start(exe, &args, "ready");
        let pid = pid_of(&child);
        wait_threads(pid, 1 + hot + blocked);
        // Let the hot threads reach their depth and the others block.
        std::thread::sleep(Duration::from_millis(100));
        let (mut tracee, image, mut libs) = seize(&child);
        let opts = StopOptions {
            timeout: Duration::from_secs(20),
            ..StopOptions::default()
        };
        let s =
            stop_the_world(&mut tracee, &image, &mut libs, &opts).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.threads.len(), 1 + hot + blocked);
        for t in &s.threads {
            match &t.readiness {
                Readiness::AtPoint => {
                    // rec frames, then hot
                    let ids: Vec<String> = t
                        .frames
                        .iter()
                        .map(|f| format!("{}@{}", f.function, f.continuation))
                        .collect();
                    // A thread that had not started yet stops at its entry.
                    if !(ids.len() == 1 && ids[0].ends_with("@entry")) {
                        assert_eq!(t.frames.len(), depth + 1, "{:?}", &ids[..ids.len().min(4)]);
                    }
                }
                Readiness::Blocked { callee, .. } => assert_eq!(callee, "read"),
                Readiness::InLibrary { callee, .. }
                | Readiness::Returned { callee }
                | Readiness::CallbackReturned { callee }
                | Readiness::UnderSignal { callee }
                | Readiness::UnderCallback { callee }
                | Readiness::Relock { callee, .. } => panic!("unexpected wait in {callee}"),
            }
        }
        out.push(s.timings);
        tracee.detach().unwrap();
        drop(child);
    }
    out
}

fn row(label: &str, t: &[StopTimings]) {
    let m = |f: fn(&StopTimings) -> Duration| median(t.iter().map(f).collect());
    eprintln!(
        "{label:<28} total {:>9.2?}  classify {:>9.2?}  arm {:>8.2?}  run {:>9.2?}  finish {:>8.2?}",
        m(|t| t.total),
        m(|t| t.classify),
        m(|t| t.arm),
        m(|t| t.run),
        m(|t| t.finish)
    );
}

#[test]
#[ignore]
fn stop_latency() {
    let d = TempDir::new("bench");
    let exe = build(&d, "bench", BENCH, Toolchain::Gcc);
    eprintln!("stop latency, median of 5 (one hot thread at a depth, or N threads):");
    for depth in [1, 10, 100, 1000, 10000] {
        row(
            &format!("depth {depth:>5}, 1 hot"),
            &measure(&exe, depth, 1, 0),
        );
    }
    for n in [1, 4, 16, 64] {
        row(
            &format!("{n:>2} hot threads, depth 10"),
            &measure(&exe, 10, n, 0),
        );
    }
    for n in [1, 4, 16, 64] {
        row(
            &format!("{n:>2} threads blocked in read"),
            &measure(&exe, 1, 0, n),
        );
    }
}
