//! Benchmark (not a test): heap transformation throughput. A process holds
//! a list of N heap nodes whose struct grows from 24 to 48 bytes in v2
//! (every node moves to a block of the process's own `malloc`, every link
//! is redirected); it is updated to v2 and the update's state phase (heap
//! walk, allocation, conversion, the sweep) is measured against copying
//! the same bytes (N × 48) into the process with one `process_vm_writev`
//! in the same run.
//!
//! `cargo bench -p upstare-runtime --bench heap_transform`. Needs gcc.

use nix::sys::signal::{kill, Signal};
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_c, instrument, spawn, CSource, Toolchain};

/// v1's and v2's node (v2 adds 24 bytes in the middle).
fn subject(v: u32) -> String {
    let pad = if v == 1 { "" } else { "char pad[24];" };
    format!(
        r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
struct node {{ long key; {pad} long val; struct node *next; }};
struct node *head;
int main(int argc, char **argv)
{{
    long n = atol(argv[1]);
    for (long i = 0; i < n; i++) {{
        struct node *e = malloc(sizeof *e);
        if (!e)
            return 2;
        e->key = i;
        e->val = 2 * i;
        e->next = head;
        head = e;
    }}
    printf("ready\n");
    fflush(stdout);
    for (;;) {{
        struct timespec ts = {{0, 2000000}};
        nanosleep(&ts, NULL);
    }}
}}
"#
    )
}

fn build(dir: &Path, v: u32) -> PathBuf {
    let src = subject(v);
    let bin = compile_c(
        CSource::Text(&src),
        Toolchain::Gcc,
        &[],
        &dir.join(format!("heap{v}")),
    )
    .expect("compile");
    let up = dir.join(format!("heap{v}.up"));
    instrument(&bin, &up);
    up
}

/// The `[heap]` mapping of `pid`.
fn heap_of(pid: i32) -> (u64, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let line = maps
        .lines()
        .find(|l| l.ends_with("[heap]"))
        .expect("a [heap] mapping");
    let range = line.split_whitespace().next().expect("range");
    let (a, b) = range.split_once('-').expect("range");
    (
        u64::from_str_radix(a, 16).expect("hex"),
        u64::from_str_radix(b, 16).expect("hex"),
    )
}

/// Copies `len` bytes of `pid`'s heap onto themselves (read, then written
/// back with one `process_vm_writev`, the process stopped meanwhile);
/// the write's time in ms.
fn copy_back(pid: i32, len: usize) -> f64 {
    let (start, end) = heap_of(pid);
    assert!(end - start >= len as u64, "heap smaller than {len} bytes");
    let p = Pid::from_raw(pid);
    kill(p, Signal::SIGSTOP).expect("stop");
    std::thread::sleep(Duration::from_millis(20));
    let remote = [RemoteIoVec {
        base: start as usize,
        len,
    }];
    let mut buf = vec![0u8; len];
    let read = process_vm_readv(p, &mut [IoSliceMut::new(&mut buf)], &remote).expect("readv");
    assert_eq!(read, len);
    let t = Instant::now();
    let wrote = process_vm_writev(p, &[IoSlice::new(&buf)], &remote).expect("writev");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(wrote, len);
    kill(p, Signal::SIGCONT).expect("continue");
    ms
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-heap");
    std::fs::create_dir_all(&dir).expect("dir");
    let (v1, v2) = (build(&dir, 1), build(&dir, 2));
    println!(
        "heap transformation: N nodes of a struct growing 24 -> 48 bytes, every node moved \
         (the process's malloc), every link redirected; state = the update's heap walk, \
         allocation, conversion and sweep (transfer + rebuild phases); copy = N x 48 bytes \
         written with one process_vm_writev, same run"
    );
    println!("| nodes | state ms | pause ms | objects/s (state) | ms per 100,000 objects | copy ms | state / copy |");
    println!("|---|---|---|---|---|---|---|");
    for n in [10_000usize, 100_000, 200_000] {
        let child = spawn(&v1, &[n.to_string()]).expect("spawn");
        child
            .wait_for_line("ready", Duration::from_secs(60), |l| l == "ready")
            .expect("ready");
        let opts = ApplyOptions {
            timeout: Duration::from_secs(30),
            ..ApplyOptions::default()
        };
        let r = apply(child.pid() as i32, &v2, &opts).unwrap_or_else(|e| panic!("update: {e}"));
        assert_eq!(r.heap_moved, n, "every node moves");
        let t = &r.timings;
        let state = (t.transfer_us + t.rebuild_us + t.sweep_us) as f64 / 1000.0;
        let pause = t.pause_us as f64 / 1000.0;
        let copy = copy_back(child.pid() as i32, n * 48);
        println!(
            "| {n} | {state:.1} | {pause:.1} | {:.0} | {:.1} | {copy:.2} | {:.0} |",
            n as f64 / (state / 1000.0),
            state * 100_000.0 / n as f64,
            state / copy
        );
    }
}
