//! Pointers kept by the kernel: the user data of an epoll registration
//! (`epoll_event.data`) is stored in the kernel and handed back with every
//! event, so neither the typed walk nor the sweep of the process's memory
//! sees it. An event loop that registers a pointer to a global handler
//! struct (or a callback) got, after a reported success, the old image's
//! struct back from `epoll_wait` and called its handler: retired code, a
//! crash. The update now reads the registrations from
//! `/proc/PID/fdinfo`, and re-registers (`EPOLL_CTL_MOD`) those pointing
//! into the old image with NEW's value. A POSIX timer's signal value is
//! kept by the kernel too, and no call can change it: one pointing into the
//! old image is named, and `--strict` refuses.

mod apply_support;

use apply_support::{build_c, send_and_expect, with_version, TempDir};
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, Toolchain};

/// An event loop on stdin and a pipe: stdin's registration carries a
/// pointer to a global handler struct, the pipe's a function pointer. A
/// line `t` on stdin also writes to the pipe.
const SRC: &str = r#"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

struct handler {
    const char *name;
    void (*on_ready)(struct handler *self, int fd);
    long count;
};

static int pipe_fds[2];
static long ticks;

static void on_tick(int fd)
{
    char c;
    if (read(fd, &c, 1) == 1) {
        ticks++;
        printf("%s tick %ld\n", VERSION, ticks);
    }
}

static void on_input(struct handler *self, int fd)
{
    char line[128];
    ssize_t n = read(fd, line, sizeof line - 1);
    if (n <= 0)
        exit(0);
    line[n] = 0;
    self->count++;
    printf("%s %s %ld\n", VERSION, self->name, self->count);
    if (line[0] == 't' && write(pipe_fds[1], "x", 1) != 1)
        exit(3);
}

static struct handler input = {"input", on_input, 0};

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int ep = epoll_create1(0);
    if (ep < 0 || pipe(pipe_fds) != 0)
        return 1;
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.ptr = &input;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) != 0)
        return 1;
    ev.data.u64 = (uint64_t)(uintptr_t)on_tick;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, pipe_fds[0], &ev) != 0)
        return 1;
    printf("%s ready\n", VERSION);
    for (;;) {
        struct epoll_event out[4];
        int n = epoll_wait(ep, out, 4, -1);
        for (int i = 0; i < n; i++) {
            if (out[i].data.u64 == (uint64_t)(uintptr_t)on_tick) {
                void (*tick)(int) = (void (*)(int))(uintptr_t)out[i].data.u64;
                tick(pipe_fds[0]);
            } else {
                struct handler *h = out[i].data.ptr;
                h->on_ready(h, 0);
            }
        }
    }
}
"#;

const WAIT: Duration = Duration::from_secs(20);

fn epoll_data_follows_the_update(tc: Toolchain) {
    tc.require();
    let dir = TempDir::new(&format!("epoll-{tc}"));
    let v1 = build_c(&dir, "v1", &with_version(SRC, "v1"), tc);
    let v2 = build_c(&dir, "v2", &with_version(SRC, "v2"), tc);
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == "v1 ready")
        .expect("ready");
    send_and_expect(
        &mut child,
        b"t\n",
        &["v1 input 1", "v1 tick 1"],
        WAIT,
        "before the update",
    );
    let opts = ApplyOptions {
        timeout: Duration::from_millis(10_000),
        strict: true,
        ..ApplyOptions::default()
    };
    let report = apply(child.pid() as i32, &v2, &opts).unwrap_or_else(|e| panic!("update: {e}"));
    assert_eq!(report.sweep.epoll_remapped, 2, "{:?}", report.warnings);
    // The event loop gets NEW's handler struct (its count carried over)
    // and NEW's callback back from the kernel.
    send_and_expect(
        &mut child,
        b"t\n",
        &["v2 input 2", "v2 tick 2"],
        WAIT,
        "after the update",
    );
    child.close_stdin();
    let out = child.wait(WAIT).expect("ends");
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
}

#[test]
fn epoll_data_follows_the_update_gcc() {
    epoll_data_follows_the_update(Toolchain::Gcc);
}

#[test]
fn epoll_data_follows_the_update_clang() {
    epoll_data_follows_the_update(Toolchain::Clang);
}

/// A timer whose signal value points at a global (not armed: only its
/// value matters); `p` prints, stdin's end ends.
const TIMER_SRC: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static long hits;

int main(void)
{
    timer_t t;
    struct sigevent se = {0};
    char c;
    setvbuf(stdout, NULL, _IOLBF, 0);
    se.sigev_notify = SIGEV_SIGNAL;
    se.sigev_signo = SIGUSR1;
    se.sigev_value.sival_ptr = &hits;
    if (timer_create(CLOCK_MONOTONIC, &se, &t) != 0)
        return 1;
    printf("%s ready\n", VERSION);
    while (read(0, &c, 1) == 1)
        if (c == 'p')
            printf("%s alive\n", VERSION);
    return 0;
}
"#;

#[test]
fn a_timer_signal_value_into_the_old_image_is_named_and_strict_refuses() {
    let tc = Toolchain::Gcc;
    tc.require();
    let dir = TempDir::new("epoll-timer");
    let v1 = build_c(&dir, "t1", &with_version(TIMER_SRC, "v1"), tc);
    let v2 = build_c(&dir, "t2", &with_version(TIMER_SRC, "v2"), tc);
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == "v1 ready")
        .expect("ready");
    let mut opts = ApplyOptions {
        timeout: Duration::from_millis(10_000),
        strict: true,
        ..ApplyOptions::default()
    };
    let refused = apply(child.pid() as i32, &v2, &opts).expect_err("strict must refuse");
    assert!(refused.to_string().contains("POSIX timer 0"), "{refused}");
    // Refused: the process goes on in v1.
    send_and_expect(&mut child, b"p", &["v1 alive"], WAIT, "after the refusal");
    opts.strict = false;
    let report = apply(child.pid() as i32, &v2, &opts).unwrap_or_else(|e| panic!("update: {e}"));
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("POSIX timer 0") && w.contains("global hits")),
        "{:?}",
        report.warnings
    );
    send_and_expect(&mut child, b"p", &["v2 alive"], WAIT, "after the update");
}

/// A handler on an alternate signal stack (`SA_ONSTACK`) and a second
/// thread waiting in `pause`. The alternate stack is in the program's
/// `.bss`, or with `ALT_IN_HEAP` defined in the heap. The kernel keeps each
/// thread's alternate stack (nothing in `/proc` shows it).
const ALTSTACK_SRC: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char alt[1 << 16];
static volatile sig_atomic_t got;

static void on_usr1(int sig)
{
    (void)sig;
    got++;
}

static void *idle(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

int main(void)
{
#ifdef ALT_IN_HEAP
    stack_t ss = {.ss_sp = malloc(sizeof alt), .ss_size = sizeof alt};
#else
    stack_t ss = {.ss_sp = alt, .ss_size = sizeof alt};
#endif
    struct sigaction sa;
    pthread_t t;
    char c;
    setvbuf(stdout, NULL, _IOLBF, 0);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_ONSTACK;
    if (ss.ss_sp == NULL || sigaltstack(&ss, NULL) != 0 || sigaction(SIGUSR1, &sa, NULL) != 0)
        return 1;
    if (pthread_create(&t, NULL, idle, NULL) != 0)
        return 1;
    printf("%s ready\n", VERSION);
    while (read(0, &c, 1) == 1)
        if (c == 's') {
            raise(SIGUSR1);
            printf("%s handled %d\n", VERSION, (int)got);
        }
    return 0;
}
"#;

/// Builds v1 and v2 of `src` (gcc), starts v1 until it prints `ready`,
/// has it handle a signal once, and gives the update options.
fn start_handling(
    src: &str,
    tag: &str,
    ready: &str,
) -> (
    TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    upstare_testkit::ChildGuard,
    ApplyOptions,
) {
    let tc = Toolchain::Gcc;
    tc.require();
    let dir = TempDir::new(tag);
    let v1 = build_c(&dir, "v1", &with_version(src, "v1"), tc);
    let v2 = build_c(&dir, "v2", &with_version(src, "v2"), tc);
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == ready)
        .expect("ready");
    send_and_expect(
        &mut child,
        b"s",
        &["v1 handled 1"],
        WAIT,
        "before the update",
    );
    let opts = ApplyOptions {
        timeout: Duration::from_millis(10_000),
        ..ApplyOptions::default()
    };
    (dir, v1, v2, child, opts)
}

/// The alternate stack in the old image's `.bss`: that data is not
/// unmapped (it was, under the handler, and the next signal killed the
/// process), and the handler still runs after the update.
#[test]
fn a_handler_on_an_alternate_stack_in_the_old_data_still_runs() {
    let (_dir, _v1, v2, mut child, opts) =
        start_handling(ALTSTACK_SRC, "epoll-altstack", "v1 ready");
    let report = apply(child.pid() as i32, &v2, &opts).unwrap_or_else(|e| panic!("update: {e}"));
    assert!(
        report
            .retired
            .kept_reasons
            .iter()
            .any(|k| k.contains("alternate stack")),
        "{:?}",
        report.retired.kept_reasons
    );
    send_and_expect(
        &mut child,
        b"s",
        &["v2 handled 2"],
        WAIT,
        "after the update",
    );
}

/// The alternate stack in the heap: every thread's alternate stack is
/// read (none lies in the old image), so the old image's writable data is
/// unmapped as usual instead of kept (it was kept at every update of such
/// a program, redis's among them: half a megabyte more per update, and as
/// much more to sweep).
#[test]
fn a_handler_on_an_alternate_stack_in_the_heap_lets_the_old_data_go() {
    let (dir, v1, v2, mut child, opts) = start_handling(
        &format!("#define ALT_IN_HEAP 1\n{ALTSTACK_SRC}"),
        "epoll-altstack-heap",
        "v1 ready",
    );
    apply(child.pid() as i32, &v2, &opts).unwrap_or_else(|e| panic!("update: {e}"));
    send_and_expect(
        &mut child,
        b"s",
        &["v2 handled 2"],
        WAIT,
        "after the update",
    );
    // The starting image's data stays for other reasons (libc's `stdout`
    // lives there); an image the updater mapped goes whole, data included.
    let v1_again = apply_support::fresh_copy(&v1, &dir, "again");
    let report =
        apply(child.pid() as i32, &v1_again, &opts).unwrap_or_else(|e| panic!("update: {e}"));
    assert!(
        !report
            .retired
            .kept_reasons
            .iter()
            .any(|k| k.contains("alternate stack")),
        "{:?}",
        report.retired.kept_reasons
    );
    assert_eq!(report.retired.kept, 0, "{:?}", report.retired);
    send_and_expect(
        &mut child,
        b"s",
        &["v1 handled 3"],
        WAIT,
        "after the second update",
    );
}
