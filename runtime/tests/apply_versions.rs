//! Cross-version live updates of the corpus version pairs: functions active on
//! the stack change (a loop body in main, every frame of a deep recursion,
//! main itself, an idle server's reply, a worker shared by 8 threads), and
//! after `apply` the same process shows the new behaviour with its old state.

mod apply_support;

use apply_support::instrumented;
use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;
use upstare_corpus::version_pair;
use upstare_runtime::update::{apply, ApplyOptions, UpdateReport};
use upstare_testkit::{spawn, ChildGuard, Toolchain};

const WAIT: Duration = Duration::from_secs(20);

fn pair(name: &str, tc: Toolchain) -> (PathBuf, PathBuf) {
    let p = version_pair(name).unwrap_or_else(|| panic!("no version pair {name}"));
    (instrumented(&p.v1, tc), instrumented(&p.v2, tc))
}

fn update(child: &ChildGuard, to: &std::path::Path, timeout_ms: u64) -> UpdateReport {
    let opts = ApplyOptions {
        timeout: Duration::from_millis(timeout_ms),
        ..ApplyOptions::default()
    };
    apply(child.pid() as i32, to, &opts).unwrap_or_else(|e| {
        panic!(
            "update failed: {e}\nstdout so far:\n{}",
            child.stdout_so_far()
        )
    })
}

/// `key=<number>` in `line`.
fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn quit_and_wait(mut child: ChildGuard) -> upstare_testkit::Output {
    child.send_stdin(b"quit\n").expect("send quit");
    child.wait(WAIT).expect("program ends")
}

fn loop_body(tc: Toolchain) {
    let (v1, v2) = pair("loop_body", tc);
    let child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("a few v1 ticks", WAIT, |l| l.starts_with("v1 tick 5 "))
        .unwrap_or_else(|e| panic!("{e}"));
    let report = update(&child, &v2, 1000);
    assert!(!report.threads.is_empty());
    let first_v2 = child
        .wait_for_line("a v2 tick", WAIT, |l| l.starts_with("v2 tick "))
        .expect("v2 runs");
    let out = quit_and_wait(child);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    // The last v1 tick before the update, and state continuity after it.
    let lines: Vec<&str> = out.stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == first_v2)
        .expect("first v2 line");
    let last_v1 = lines[..at]
        .iter()
        .rev()
        .find(|l| l.starts_with("v1 tick "))
        .expect("a v1 tick before");
    assert!(
        lines[at..].iter().all(|l| !l.starts_with("v1 ")),
        "v1 code ran after the update"
    );
    let tick = |l: &str| {
        l.split_whitespace()
            .nth(2)
            .and_then(|t| t.parse::<i64>().ok())
            .expect("tick")
    };
    let (t1, t2) = (tick(last_v1), tick(&first_v2));
    assert_eq!(
        t2,
        t1 + 1,
        "the loop counter carried over: {last_v1} / {first_v2}"
    );
    let (s1, s2) = (field(last_v1, "sum"), field(&first_v2, "total"));
    assert_eq!(
        s2,
        (s1 + t2 * 7 + 11) % 1000003,
        "the sum carried over and v2's formula applies"
    );
    assert!(out.stdout.contains("v2 done"), "v2's main finished the run");
}

#[test]
fn loop_body_changes_in_running_main_gcc() {
    loop_body(Toolchain::Gcc);
}

#[test]
fn loop_body_changes_in_running_main_clang() {
    loop_body(Toolchain::Clang);
}

fn deep_frames(tc: Toolchain) {
    let (v1, v2) = pair("deep_frames", tc);
    let child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("idling at the bottom", WAIT, |l| {
            l.starts_with("v1 bottom tick 2 ")
        })
        .expect("v1 bottom");
    let report = update(&child, &v2, 1000);
    let frames: usize = report.threads.iter().map(|t| t.frames.len()).sum();
    assert!(
        frames > 200,
        "every frame of the recursion was rebuilt ({frames} frames)"
    );
    child
        .wait_for_line("v2 at the bottom", WAIT, |l| {
            l.starts_with("v2 bottom tick")
        })
        .expect("v2 bottom");
    let out = quit_and_wait(child);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    // The recursion unwinds through v2's code in every rebuilt frame: the
    // result equals a fresh v2 run's.
    let fresh = spawn(&v2, &[] as &[&str]).expect("spawn v2");
    fresh
        .wait_for_line("fresh v2 bottom", WAIT, |l| l.starts_with("v2 bottom tick"))
        .expect("fresh v2");
    let fresh_out = quit_and_wait(fresh);
    let result = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("v2 result="))
            .map(str::to_string)
    };
    let got = result(&out.stdout).expect("updated run prints v2's result");
    assert_eq!(
        Some(got),
        result(&fresh_out.stdout),
        "updated result differs from a fresh v2 run"
    );
}

#[test]
fn deep_recursion_frames_change_layout_gcc() {
    deep_frames(Toolchain::Gcc);
}

#[test]
fn deep_recursion_frames_change_layout_clang() {
    deep_frames(Toolchain::Clang);
}

#[test]
fn main_itself_changes() {
    let (v1, v2) = pair("main_changes", Toolchain::Gcc);
    let child = spawn(&v1, &[] as &[&str]).expect("spawn");
    let last = child
        .wait_for_line("v1 main", WAIT, |l| l.starts_with("v1 main i=4 "))
        .unwrap_or_else(|e| panic!("{e}"));
    let report = update(&child, &v2, 1000);
    // v2 declares `long bonus = 100;` before its loop: a frame paused in
    // the loop has passed that declaration, so bonus holds 100, not zero.
    assert!(
        !report
            .warnings
            .iter()
            .any(|w| w.contains("bonus starts as zero")),
        "bonus takes its initializer: {:?}",
        report.warnings
    );
    let first = child
        .wait_for_line("v2 main", WAIT, |l| l.starts_with("v2 main "))
        .expect("v2 runs");
    let out = quit_and_wait(child);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(
        field(&first, "i") > field(&last, "i"),
        "i carried over: {last} / {first}"
    );
    assert_eq!(field(&first, "bonus"), 100);
    assert!(out.stdout.contains("v2 done"));
}

#[test]
fn idle_server_blocked_in_read_changes_reply() {
    let (v1, v2) = pair("echo_server", Toolchain::Gcc);
    let child = spawn(&v1, &[] as &[&str]).expect("spawn");
    let listening = child
        .wait_for_line("listening", WAIT, |l| l.starts_with("v1 listening"))
        .expect("listening");
    let port = field(&listening, "port");
    let stream = TcpStream::connect(("127.0.0.1", port as u16)).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut w = stream;
    let mut line = String::new();
    w.write_all(b"hello\n").expect("send");
    reader.read_line(&mut line).expect("reply");
    assert_eq!(line, "echo: hello\n");
    // The server now sits in recv on this connection.
    std::thread::sleep(Duration::from_millis(50));
    let report = update(&child, &v2, 1000);
    assert!(
        report.threads[0].state.contains("blocked"),
        "updated while blocked: {:?}",
        report.threads[0]
    );
    line.clear();
    w.write_all(b"again\n")
        .expect("send on the same connection");
    reader.read_line(&mut line).expect("reply after the update");
    assert!(
        line.starts_with("v2 echo #") && line.ends_with(": again\n"),
        "reply {line:?}"
    );
    line.clear();
    w.write_all(b"quit\n").expect("quit");
    reader.read_line(&mut line).expect("bye");
    assert_eq!(line, "v2 bye\n");
    let out = child_wait(child);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
}

fn child_wait(mut child: ChildGuard) -> upstare_testkit::Output {
    child.close_stdin();
    child.wait(WAIT).expect("program ends")
}

#[test]
fn eight_threads_in_mixed_states() {
    let (v1, v2) = pair("threads8", Toolchain::Gcc);
    let child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("started", WAIT, |l| l.starts_with("v1 started 8 threads"))
        .expect("started");
    for id in 0..8 {
        child
            .wait_for_line("each worker reports", WAIT, |l| {
                l.starts_with(&format!("v1 worker {id} "))
            })
            .expect("worker reports");
    }
    let report = update(&child, &v2, 3000);
    assert_eq!(
        report.threads.len(),
        9,
        "main and 8 workers: {:?}",
        report.threads
    );
    for id in 0..8 {
        child
            .wait_for_line("each worker runs v2", WAIT, |l| {
                l.starts_with(&format!("v2 worker {id} "))
            })
            .expect("v2 worker step");
    }
    let out = quit_and_wait(child);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("v2 joined 8 threads"), "{}", out.stdout);
    // Invariant: each worker's step counter keeps increasing across the update.
    for id in 0..8 {
        let steps: Vec<i64> = out
            .stdout
            .lines()
            .filter(|l| l.contains(&format!(" worker {id} step ")))
            .map(|l| {
                l.split_whitespace()
                    .nth(4)
                    .and_then(|s| s.parse().ok())
                    .expect("step")
            })
            .collect();
        assert!(
            steps.windows(2).all(|w| w[1] > w[0]),
            "worker {id} steps {steps:?}"
        );
    }
}
