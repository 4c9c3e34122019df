//! Inputs are checked before the process is touched: NEW, a PATCH and a
//! SPEC that are a character device (`/dev/zero`), a FIFO or a 10 GB sparse
//! file are refused at once, with one line naming the file and what it is.
//!
//! The proof that the refusal comes before the first ptrace call: while
//! `upstare-apply` runs, the test itself traces the target, so any attempt
//! to seize it would fail with a ptrace error instead of the input refusal.
//! The target keeps running (its ticks continue) during and after.

mod apply_support;

use apply_support::TempDir;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use upstare_testkit::{run_command, spawn, ChildGuard, Toolchain};

const WAIT: Duration = Duration::from_secs(20);

const TICKER: &str = r#"
#include <stdio.h>
#include <time.h>
long total;
int main(void)
{
    for (int i = 0; i < 100000; i++) {
        total += 3;
        printf("tick %d total=%ld\n", i, total);
        fflush(stdout);
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    return 0;
}
"#;

fn ticks(child: &ChildGuard) -> usize {
    child.stdout_so_far().lines().count()
}

/// Waits until the target printed two more ticks than it had.
fn ticks_continue(child: &ChildGuard, what: &str) {
    let last = ticks(child);
    child
        .wait_for_line(what, WAIT, |l| {
            l.starts_with(&format!("tick {} ", last + 2))
        })
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Runs `upstare-apply ARGS` (bounded) and returns its stderr; it must
/// fail with exit status 1.
fn refused(args: &[&std::ffi::OsStr]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_upstare-apply"));
    cmd.args(args);
    let out = run_command(cmd, WAIT).unwrap_or_else(|e| panic!("upstare-apply: {e}"));
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    out.stderr
}

#[test]
fn devices_fifos_and_huge_files_are_refused_before_the_target_is_stopped() {
    let dir = TempDir::new("apply-inputs");
    let v1 = apply_support::build_c(&dir, "ticker", TICKER, Toolchain::Gcc);
    let copy = apply_support::fresh_copy(&v1, &dir, "copy");
    let fifo = dir.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success(), "mkfifo");
    let sparse = dir.join("sparse");
    std::fs::File::create(&sparse)
        .and_then(|f| f.set_len(10 << 30))
        .expect("10 GB sparse file");
    let dev_zero = PathBuf::from("/dev/zero");

    let child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ticks", WAIT, |l| l.starts_with("tick 3 "))
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = child.pid().to_string();

    // Hold the target traced (and running) so that upstare-apply cannot
    // seize it: only a refusal made before any ptrace call can name the
    // input.
    let holder = apply_support::hold_traced(child.pid());

    let p = |s: &Path| s.as_os_str().to_owned();
    let cases: Vec<(&str, Vec<std::ffi::OsString>, &str)> = vec![
        (
            "NEW /dev/zero",
            vec!["--to".into(), p(&dev_zero)],
            "is a character device, not a regular file",
        ),
        (
            "NEW FIFO",
            vec!["--to".into(), p(&fifo)],
            "is a FIFO, not a regular file",
        ),
        (
            "NEW sparse",
            vec!["--to".into(), p(&sparse)],
            "10737418240 bytes is larger than the limit",
        ),
        (
            "NEW directory",
            vec!["--to".into(), p(dir.path())],
            "is a directory, not a regular file",
        ),
        (
            "PATCH /dev/zero",
            vec![p(&dev_zero)],
            "is a character device, not a regular file",
        ),
        (
            "PATCH FIFO",
            vec![p(&fifo)],
            "is a FIFO, not a regular file",
        ),
        (
            "PATCH sparse",
            vec![p(&sparse)],
            "10737418240 bytes is larger than the limit",
        ),
        (
            "SPEC FIFO",
            vec!["--to".into(), p(&copy), "--spec".into(), p(&fifo)],
            "is a FIFO, not a regular file",
        ),
        (
            "SPEC /dev/zero",
            vec!["--to".into(), p(&copy), "--spec".into(), p(&dev_zero)],
            "is a character device",
        ),
    ];
    for (what, extra, needle) in &cases {
        let mut args: Vec<std::ffi::OsString> = vec!["--pid".into(), pid.clone().into()];
        args.extend(extra.iter().cloned());
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let err = refused(&refs);
        println!("{what}: {err}");
        assert!(err.contains(needle), "{what}: {err}");
        assert!(!err.contains("PTRACE"), "{what}: touched the target: {err}");
        // The target ran on during the refusal.
        ticks_continue(&child, what);
    }
    holder.detach().expect("detach");
    ticks_continue(&child, "after detach");
    for (i, l) in child.stdout_so_far().lines().enumerate() {
        assert_eq!(l, format!("tick {i} total={}", 3 * (i + 1)), "line {i}");
    }
}
