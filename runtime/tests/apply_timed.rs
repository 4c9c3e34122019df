//! The stop does not change what blocking calls observe. A blocked read
//! whose update is refused still returns its byte (the remote calls of the
//! update left it in a system call stop, from which the kernel did not
//! restart it: it returned -ERESTARTSYS). A thread in a
//! 200 ms `epoll_wait` is interrupted every few milliseconds while an
//! update waits for another thread, and each restart gets what is left of
//! its timeout, not the full 200 ms again, so the wait still times out and
//! the loop still ticks while the update waits (then refuses on its
//! `--timeout`, process untouched). The same holds for the timed waits
//! whose timeout is a `struct timespec` read at every start
//! (`rt_sigtimedwait`, `epoll_pwait2`): each restart gets what is left,
//! and the program's own timespec is left as it was.

mod apply_support;

use apply_support::{build_c, fresh_copy, TempDir};
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, Toolchain};

/// A ticker in `epoll_wait(…, 200)` reached through `syscall()` (not a
/// known-safe call: the thread is never ready, and is interrupted every
/// poll interval), and main waiting in `pause()` reached the same way.
const TICKER: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <unistd.h>

static int ticks;

static void *ticker(void *arg)
{
    struct epoll_event ev;
    int ep = epoll_create1(0);
    (void)arg;
    for (;;) {
        long n = syscall(SYS_epoll_wait, ep, &ev, 1, 200);
        if (n == 0) {
            ticks++;
            printf("tick %d\n", ticks);
        }
    }
    return NULL;
}

int main(void)
{
    pthread_t t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_create(&t, NULL, ticker, NULL);
    printf("ready\n");
    for (;;)
        syscall(SYS_pause);
    return 0;
}
"#;

fn ticks(out: &str) -> usize {
    out.lines().filter(|l| l.starts_with("tick ")).count()
}

#[test]
fn a_timed_wait_keeps_its_deadline_while_an_update_waits() {
    let dir = TempDir::new("timed");
    let exe = build_c(&dir, "ticker", TICKER, Toolchain::Gcc);
    let copy = fresh_copy(&exe, &dir, "copy");
    let child = spawn(&exe, &[] as &[&str]).expect("spawn");
    let wait = Duration::from_secs(20);
    child
        .wait_for_line("first tick", wait, |l| l == "tick 1")
        .expect("ticks");
    let before = ticks(&child.stdout_so_far());
    let opts = ApplyOptions {
        timeout: Duration::from_millis(1200),
        ..ApplyOptions::default()
    };
    let refused = apply(child.pid() as i32, &copy, &opts);
    let during = ticks(&child.stdout_so_far()) - before;
    let e = refused.expect_err("the threads never get ready");
    assert!(e.to_string().contains("syscall"), "{e}");
    // 1.2 s of 200 ms timeouts: about 6 ticks; none if every interruption
    // restarted the full timeout.
    assert!(during >= 3, "{during} ticks while the update waited");
    // Untouched: it ticks on.
    let next = format!("tick {}", before + during + 2);
    child
        .wait_for_line("ticks after", wait, |l| l == next)
        .expect("ticks on after the refusal");
}

/// main blocked in `read` (ready: re-executable), a thread in `pause()`
/// through `syscall()` (never ready).
const READER: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

static void *sleeper(void *arg)
{
    (void)arg;
    for (;;)
        syscall(SYS_pause);
    return NULL;
}

int main(void)
{
    pthread_t t;
    char c = '?';
    long n;
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_create(&t, NULL, sleeper, NULL);
    printf("ready\n");
    n = read(0, &c, 1);
    printf("got %ld %c\n", n, c);
    return 0;
}
"#;

#[test]
fn a_refused_update_leaves_a_blocked_read_blocked() {
    let dir = TempDir::new("reader");
    let exe = build_c(&dir, "reader", READER, Toolchain::Gcc);
    let copy = fresh_copy(&exe, &dir, "copy");
    let mut child = spawn(&exe, &[] as &[&str]).expect("spawn");
    let wait = Duration::from_secs(20);
    child
        .wait_for_line("ready", wait, |l| l == "ready")
        .expect("ready");
    std::thread::sleep(Duration::from_millis(100));
    let opts = ApplyOptions {
        timeout: Duration::from_millis(300),
        ..ApplyOptions::default()
    };
    let refused = apply(child.pid() as i32, &copy, &opts);
    assert!(refused.is_err(), "the sleeper is never ready");
    child.send_stdin(b"x").expect("send");
    let line = child
        .wait_for_line("the read's result", wait, |l| l.starts_with("got "))
        .expect("read returns");
    assert_eq!(line, "got 1 x");
}

/// Two tickers, in `rt_sigtimedwait` for a signal that never comes and in
/// `epoll_pwait2` on an empty epoll set, each with a 200 ms timespec and
/// reached through `syscall()` (never ready: interrupted every poll
/// interval); main in `pause()` the same way. Each tick also checks that
/// its timespec still says 200 ms.
const TIMESPEC_TICKERS: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int sig_ticks, ep_ticks;

static void *sig_ticker(void *arg)
{
    sigset_t set;
    struct timespec ts = {0, 200000000};
    (void)arg;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    for (;;) {
        long n = syscall(SYS_rt_sigtimedwait, &set, NULL, &ts, 8);
        if (n < 0 && ts.tv_sec == 0 && ts.tv_nsec == 200000000) {
            sig_ticks++;
            printf("sig tick %d\n", sig_ticks);
        }
    }
    return NULL;
}

static void *ep_ticker(void *arg)
{
    struct epoll_event ev;
    struct timespec ts = {0, 200000000};
    int ep = epoll_create1(0);
    (void)arg;
    for (;;) {
        long n = syscall(SYS_epoll_pwait2, ep, &ev, 1, &ts, NULL, 8);
        if (n == 0 && ts.tv_sec == 0 && ts.tv_nsec == 200000000) {
            ep_ticks++;
            printf("ep tick %d\n", ep_ticks);
        }
    }
    return NULL;
}

int main(void)
{
    pthread_t a, b;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_create(&a, NULL, sig_ticker, NULL);
    pthread_create(&b, NULL, ep_ticker, NULL);
    printf("ready\n");
    for (;;)
        syscall(SYS_pause);
    return 0;
}
"#;

fn count(out: &str, prefix: &str) -> usize {
    out.lines().filter(|l| l.starts_with(prefix)).count()
}

#[test]
fn timespec_waits_keep_their_deadline_while_an_update_waits() {
    let dir = TempDir::new("timespec");
    let exe = build_c(&dir, "timespec", TIMESPEC_TICKERS, Toolchain::Gcc);
    let copy = fresh_copy(&exe, &dir, "copy");
    let child = spawn(&exe, &[] as &[&str]).expect("spawn");
    let wait = Duration::from_secs(20);
    for first in ["sig tick 1", "ep tick 1"] {
        child
            .wait_for_line(first, wait, |l| l == first)
            .expect("ticks");
    }
    let out = child.stdout_so_far();
    let (sig0, ep0) = (count(&out, "sig tick "), count(&out, "ep tick "));
    let opts = ApplyOptions {
        timeout: Duration::from_millis(1200),
        ..ApplyOptions::default()
    };
    let refused = apply(child.pid() as i32, &copy, &opts);
    let out = child.stdout_so_far();
    let (sig, ep) = (
        count(&out, "sig tick ") - sig0,
        count(&out, "ep tick ") - ep0,
    );
    refused.expect_err("the threads never get ready");
    // 1.2 s of 200 ms timeouts: about 6 ticks each; none if every
    // interruption restarted the full timeout.
    assert!(sig >= 3, "{sig} sigtimedwait ticks while the update waited");
    assert!(ep >= 3, "{ep} epoll_pwait2 ticks while the update waited");
    for next in [
        format!("sig tick {}", sig0 + sig + 2),
        format!("ep tick {}", ep0 + ep + 2),
    ] {
        child
            .wait_for_line(&next, wait, |l| l == next)
            .expect("ticks on after the refusal");
    }
}
