//! A program driven by libevent, idle in `event_base_loop` (epoll_wait two
//! library frames down), is updated with its callback changed: the loop is
//! left in place, the callback libevent holds is pointed at NEW's, and the
//! next event runs v2's callback; the loop's return lands in NEW's main.

mod apply_support;

use apply_support::{apply_within, with_version, TempDir};
use std::time::Duration;
use upstare_testkit::{compile_instrumented, spawn, Toolchain};

const PROGRAM: &str = r#"
#include <event2/event.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static struct event_base *base;
static int lines;

static void on_input(evutil_socket_t fd, short what, void *arg)
{
    char buf[64];
    long n = read(fd, buf, sizeof buf - 1);
    (void)what;
    (void)arg;
    if (n <= 0) {
        event_base_loopbreak(base);
        return;
    }
    buf[n] = 0;
    if (n > 0 && buf[n - 1] == '\n')
        buf[n - 1] = 0;
    lines++;
    if (strcmp(buf, "quit") == 0) {
        event_base_loopbreak(base);
        return;
    }
    printf(VERSION " got %s (%d)\n", buf, lines);
}

int main(void)
{
    struct event *ev;
    setvbuf(stdout, NULL, _IOLBF, 0);
    base = event_base_new();
    ev = event_new(base, 0, EV_READ | EV_PERSIST, on_input, NULL);
    event_add(ev, NULL);
    printf(VERSION " ready %s\n", event_base_get_method(base));
    event_base_dispatch(base);
    printf(VERSION " loop ended after %d lines\n", lines);
    event_free(ev);
    event_base_free(base);
    return 0;
}
"#;

fn idle_in_event_base_loop(tc: Toolchain) {
    tc.require();
    let dir = TempDir::new(&format!("libevent-{tc}"));
    let flags = ["-Wl,--no-as-needed", "-levent"];
    let v1 = compile_instrumented(dir.path(), "ev1", &with_version(PROGRAM, "v1"), tc, &flags);
    let v2 = compile_instrumented(dir.path(), "ev2", &with_version(PROGRAM, "v2"), tc, &flags);
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    let wait = Duration::from_secs(20);
    child
        .wait_for_line("ready", wait, |l| l.starts_with("v1 ready "))
        .expect("ready");
    child.send_stdin(b"one\n").expect("send");
    child
        .wait_for_line("v1 callback", wait, |l| l == "v1 got one (1)")
        .expect("v1 callback");
    std::thread::sleep(Duration::from_millis(100));
    let report = apply_within(child.pid(), &v2, Duration::from_secs(10));
    assert!(
        report.threads[0].state.contains("event_base_dispatch"),
        "{:?}",
        report.threads
    );
    child.send_stdin(b"two\n").expect("send");
    child
        .wait_for_line("v2 callback", wait, |l| l == "v2 got two (2)")
        .expect("the next event runs v2's callback");
    child.send_stdin(b"quit\n").expect("quit");
    let out = child.wait(wait).expect("ends");
    assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.ends_with("v2 loop ended after 3 lines\n"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_libevent_program_idle_in_its_loop_runs_the_new_callback_gcc() {
    idle_in_event_base_loop(Toolchain::Gcc);
}

#[test]
fn a_libevent_program_idle_in_its_loop_runs_the_new_callback_clang() {
    idle_in_event_base_loop(Toolchain::Clang);
}
