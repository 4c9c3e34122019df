//! A system call the stop interrupted is restarted on every resume: the
//! program never sees a result it could not have had without us. main
//! loops on a timed wait (`epoll_wait`, `sigtimedwait`, `poll`, 100 ms)
//! while three threads wait in `pthread_cond_wait` (led out and parked
//! while stopping, so main, ready in a safe call, is resumed meanwhile).
//! The rescue handler's remote calls run on main before the stop and left
//! it in a system-call stop, where the stop set the restart code for the
//! EINTR its interrupt caused: resumed from there, `epoll_wait` returned
//! -1 errno 514 (ERESTARTNOHAND) to the program (redis panicked on it).
//! The program aborts on any -1 its wait may not return; identity updates,
//! a dry run and refused updates must leave it ticking.

mod apply_support;

use apply_support::{build_c, fresh_copy, TempDir};
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, ChildGuard, Toolchain};

/// The loop and the condition waiters; `WAIT_ONCE()` is one timed wait
/// (0 or the timeout's own -1 when nothing happened), defined per variant.
const LOOP: &str = r#"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t c = PTHREAD_COND_INITIALIZER;
static int go;

static void *waiter(void *arg)
{
    pthread_mutex_lock(&m);
    while (!go)
        pthread_cond_wait(&c, &m);
    pthread_mutex_unlock(&m);
    return arg;
}

/* Never ready: pause() reached through syscall() is no known call. */
static void *stuck(void *arg)
{
    for (;;)
        syscall(SYS_pause);
    return arg;
}

int main(int argc, char **argv)
{
    pthread_t t[4];
    setvbuf(stdout, NULL, _IOLBF, 0);
    SETUP();
    for (int i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, waiter, NULL);
    if (argc > 1 && strcmp(argv[1], "stuck") == 0)
        pthread_create(&t[3], NULL, stuck, NULL);
    for (long i = 1;; i++) {
        long r = WAIT_ONCE();
        if (r != 0) {
            printf("BAD result %ld errno %d\n", r, errno);
            abort();
        }
        printf("tick %ld\n", i);
    }
    return 0;
}
"#;

/// epoll_wait on an empty set: 0 after 100 ms.
const EPOLL: &str = r#"
#include <sys/epoll.h>
static int ep;
static struct epoll_event evs[4];
#define SETUP() (ep = epoll_create1(0))
#define WAIT_ONCE() ((long)epoll_wait(ep, evs, 4, 100))
"#;

/// sigtimedwait for a signal never sent: -1 EAGAIN after 100 ms (its own
/// timeout, counted as 0 here); anything else is an error.
const SIGTIMEDWAIT: &str = r#"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
static sigset_t set;
static long wait_signal(void)
{
    struct timespec ts = {0, 100 * 1000 * 1000};
    siginfo_t info;
    int r = sigtimedwait(&set, &info, &ts);
    return r == -1 && errno == EAGAIN ? 0 : (r == -1 ? -1 : 1000 + r);
}
#define SETUP() (sigemptyset(&set), sigaddset(&set, SIGUSR1), \
                 pthread_sigmask(SIG_BLOCK, &set, NULL))
#define WAIT_ONCE() wait_signal()
"#;

/// poll on nothing: 0 after 100 ms.
const POLL: &str = r#"
#include <poll.h>
#define SETUP() ((void)0)
#define WAIT_ONCE() ((long)poll(NULL, 0, 100))
"#;

const WAIT: Duration = Duration::from_secs(20);

/// The ticks printed so far, checked to be 1, 2, 3... with nothing else.
fn ticks(child: &ChildGuard) -> u64 {
    let out = child.stdout_so_far();
    let mut n = 0;
    for line in out.lines() {
        n += 1;
        assert_eq!(line, format!("tick {n}"), "output:\n{out}");
    }
    n
}

/// Waits until the program ticked twice more (it goes on, untouched).
fn goes_on(child: &ChildGuard, what: &str) {
    let next = format!("tick {}", ticks(child) + 2);
    child
        .wait_for_line(what, WAIT, |l| l == next)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    ticks(child);
}

fn build(wait: &str, name: &str, tc: Toolchain) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new(name);
    let src = format!("{}\n{wait}\n{}", "#define _GNU_SOURCE", LOOP);
    let exe = build_c(&dir, name, &src, tc);
    (dir, exe)
}

/// Ten identity updates in a row, then a dry run, each succeeding, and an
/// update to an incompatible NEW, refused after the stop, and one to a
/// file not instrumented, refused before it (the threads seized and
/// interrupted): the loop ticks on after each, never seeing an error.
fn updates_restart_the_wait(wait: &str, name: &str, tc: Toolchain) {
    let (dir, exe) = build(wait, name, tc);
    let child = spawn(&exe, &[] as &[&str]).expect("spawn");
    goes_on(&child, "first ticks");
    let pid = child.pid() as i32;
    for i in 0..10 {
        let to = fresh_copy(&exe, &dir, &format!("v{i}"));
        let opts = ApplyOptions {
            timeout: Duration::from_secs(3),
            ..ApplyOptions::default()
        };
        if let Err(e) = apply(pid, &to, &opts) {
            panic!("update {i}: {e}\noutput:\n{}", child.stdout_so_far());
        }
        goes_on(&child, &format!("ticks after update {i}"));
    }
    let to = fresh_copy(&exe, &dir, "dry");
    let opts = ApplyOptions {
        timeout: Duration::from_secs(3),
        dry_run: true,
        ..ApplyOptions::default()
    };
    if let Err(e) = apply(pid, &to, &opts) {
        panic!("dry run: {e}");
    }
    goes_on(&child, "ticks after the dry run");
    // Refused after the stop: main's call and the waiters' function are
    // gone in NEW.
    let other = build_c(&dir, "other", OTHER, tc);
    let opts = ApplyOptions {
        timeout: Duration::from_secs(3),
        ..ApplyOptions::default()
    };
    let refused = apply(pid, &other, &opts);
    let e = refused.expect_err("NEW lacks what the threads are in");
    assert!(e.to_string().contains("the new version"), "{e}");
    goes_on(&child, "ticks after the incompatible update");
    // Refused before the stop (after seizing): NEW is not instrumented.
    let plain = dir.path().join(name);
    let refused = apply(pid, &plain, &opts);
    let e = refused.expect_err("NEW is not instrumented");
    assert!(e.to_string().contains("upstare-rewrite"), "{e}");
    goes_on(&child, "ticks after the update refused before the stop");
}

/// Updates refused on their timeout (a thread is never ready): rolled
/// back, the loop ticks on without error.
fn a_refusal_restarts_the_wait(wait: &str, name: &str, tc: Toolchain) {
    let (dir, exe) = build(wait, name, tc);
    let child = spawn(&exe, &["stuck"]).expect("spawn");
    goes_on(&child, "first ticks");
    for i in 0..2 {
        let to = fresh_copy(&exe, &dir, &format!("r{i}"));
        let opts = ApplyOptions {
            timeout: Duration::from_millis(300),
            ..ApplyOptions::default()
        };
        let refused = apply(child.pid() as i32, &to, &opts);
        let e = refused.expect_err("the stuck thread is never ready");
        assert!(e.to_string().contains("pause"), "{e}");
        goes_on(&child, &format!("ticks after refusal {i}"));
    }
}

/// An incompatible NEW: none of the loop's functions but main.
const OTHER: &str = r#"
int spins;
int main(void)
{
    for (;;)
        spins++;
    return 0;
}
"#;

#[test]
fn epoll_wait_restarts_gcc() {
    updates_restart_the_wait(EPOLL, "epoll", Toolchain::Gcc);
}

#[test]
fn epoll_wait_restarts_clang() {
    updates_restart_the_wait(EPOLL, "epoll", Toolchain::Clang);
}

#[test]
fn sigtimedwait_restarts_gcc() {
    updates_restart_the_wait(SIGTIMEDWAIT, "sigwait", Toolchain::Gcc);
}

#[test]
fn sigtimedwait_restarts_clang() {
    updates_restart_the_wait(SIGTIMEDWAIT, "sigwait", Toolchain::Clang);
}

#[test]
fn poll_restarts_gcc() {
    updates_restart_the_wait(POLL, "poll", Toolchain::Gcc);
}

#[test]
fn poll_restarts_clang() {
    updates_restart_the_wait(POLL, "poll", Toolchain::Clang);
}

#[test]
fn refused_update_restarts_epoll_wait() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        a_refusal_restarts_the_wait(EPOLL, "epoll_refused", tc);
    }
}

#[test]
fn refused_update_restarts_sigtimedwait() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        a_refusal_restarts_the_wait(SIGTIMEDWAIT, "sigwait_refused", tc);
    }
}
