//! A library call left in place goes on after the update with the
//! pointers it holds: `pthread_join(t, &ret)` writes the thread's result
//! through `&ret` when the thread ends. When the new version's frame keeps
//! `ret` where it was, the update goes on and the new code reads the
//! result; when `ret` moves in the new frame (two locals swapped), the
//! update is refused naming the call, the pointer and the local — the
//! result would land in what is no longer `ret` — and the process goes on
//! in the old version as if nothing happened.
//!
//! A blocked call whose statement cannot run again (it has effects before
//! the call) is left in place the same way: the call returns into the new
//! version's frame, and the effect is not repeated.

mod apply_support;

use apply_support::{build_c, fresh_copy, with_version, TempDir};
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, Toolchain};

/// main joins a worker blocked in `read(0)`; the worker returns 40 + the
/// byte it read minus '0'. `SWAP` swaps the declarations of `ret` and
/// `before`: both have their address taken, so gcc and clang alike give
/// them their slots in declaration order; same size, the frame keeps its
/// size and the two trade places.
const JOINER: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static void *worker(void *arg)
{
    char c = '0';
    (void)arg;
    if (read(0, &c, 1) != 1)
        return (void *)1L;
    return (void *)(40L + (c - '0'));
}

static void show(void **ret, long *before)
{
    printf("%s joined %ld before=%ld\n", VERSION, (long)*ret, *before);
}

int main(void)
{
    pthread_t t;
#ifdef SWAP
    long before = 7;
    void *ret = 0;
#else
    void *ret = 0;
    long before = 7;
#endif
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_create(&t, NULL, worker, NULL);
    printf("%s joining\n", VERSION);
    pthread_join(t, &ret);
    show(&ret, &before);
    return 0;
}
"#;

const WAIT: Duration = Duration::from_secs(20);

fn opts() -> ApplyOptions {
    ApplyOptions {
        timeout: Duration::from_millis(10_000),
        ..ApplyOptions::default()
    }
}

fn joiner_pair(tc: Toolchain) {
    tc.require();
    let dir = TempDir::new(&format!("in-place-args-{tc}"));
    let v1 = build_c(&dir, "joiner_v1", &with_version(JOINER, "v1"), tc);
    let v2 = build_c(&dir, "joiner_v2", &with_version(JOINER, "v2"), tc);
    let swapped = format!("#define SWAP 1\n{}", with_version(JOINER, "v3"));
    let v3 = build_c(&dir, "joiner_v3", &swapped, tc);

    // `ret` moves: refused by name, v1 goes on and gets its result.
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("joining", WAIT, |l| l == "v1 joining")
        .expect("joining");
    std::thread::sleep(Duration::from_millis(100));
    let e = apply(child.pid() as i32, &v3, &opts()).expect_err("ret moves under pthread_join");
    let msg = e.to_string();
    assert!(
        msg.contains("pthread_join") && msg.contains("local ret"),
        "{msg}"
    );
    child.send_stdin(b"5").expect("byte");
    let out = child.wait(WAIT).expect("v1 ends");
    assert_eq!(
        out.stdout, "v1 joining\nv1 joined 45 before=7\n",
        "{}",
        out.stderr
    );
    assert_eq!(out.status.code(), Some(0));

    // Same frame: the update goes on; v2's code reads the result the
    // join left in `ret`.
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("joining", WAIT, |l| l == "v1 joining")
        .expect("joining");
    std::thread::sleep(Duration::from_millis(100));
    let to = fresh_copy(&v2, &dir, "v2");
    let report = apply(child.pid() as i32, &to, &opts()).expect("same frame: updated");
    assert!(
        report
            .threads
            .iter()
            .any(|t| t.state.contains("pthread_join") && t.state.contains("left in place")),
        "{:?}",
        report.threads
    );
    child.send_stdin(b"2").expect("byte");
    let out = child.wait(WAIT).expect("v2 ends");
    assert_eq!(
        out.stdout, "v1 joining\nv2 joined 42 before=7\n",
        "{}",
        out.stderr
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_join_left_in_place_keeps_its_result_pointer_gcc() {
    joiner_pair(Toolchain::Gcc);
}

#[test]
fn a_join_left_in_place_keeps_its_result_pointer_clang() {
    joiner_pair(Toolchain::Clang);
}

/// main reads stdin one byte at a time from a statement that counts the
/// call first (`calls++` runs before `read`: re-executing the statement
/// would count twice).
const COUNTER: &str = r#"
#include <stdio.h>
#include <unistd.h>

static int calls;

int main(void)
{
    char c = '?';
    long n;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("%s ready\n", VERSION);
    for (;;) {
        n = (calls++, read(0, &c, 1));
        if (n != 1)
            break;
        printf("%s got %c calls=%d\n", VERSION, c, calls);
    }
    printf("%s end calls=%d\n", VERSION, calls);
    return 0;
}
"#;

fn counter_pair(tc: Toolchain) {
    tc.require();
    let dir = TempDir::new(&format!("in-place-stmt-{tc}"));
    let v1 = build_c(&dir, "counter_v1", &with_version(COUNTER, "v1"), tc);
    let v2 = build_c(&dir, "counter_v2", &with_version(COUNTER, "v2"), tc);
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == "v1 ready")
        .expect("ready");
    child.send_stdin(b"a").expect("byte");
    child
        .wait_for_line("first byte", WAIT, |l| l == "v1 got a calls=1")
        .expect("v1 reads");
    std::thread::sleep(Duration::from_millis(100));
    let report = apply(child.pid() as i32, &v2, &opts()).expect("left in place: updated");
    assert!(
        report
            .threads
            .iter()
            .any(|t| t.state.contains("read") && t.state.contains("left in place")),
        "{:?}",
        report.threads
    );
    child.send_stdin(b"b").expect("byte");
    child.close_stdin();
    let out = child.wait(WAIT).expect("v2 ends");
    assert_eq!(
        out.stdout, "v1 ready\nv1 got a calls=1\nv2 got b calls=2\nv2 end calls=3\n",
        "{}",
        out.stderr
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_read_whose_statement_cannot_run_again_is_left_in_place_gcc() {
    counter_pair(Toolchain::Gcc);
}

#[test]
fn a_read_whose_statement_cannot_run_again_is_left_in_place_clang() {
    counter_pair(Toolchain::Clang);
}
