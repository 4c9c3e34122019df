//! Frames above a signal frame: a handler that never returns (a server
//! that serves from its signal handler, as PostgreSQL's postmaster children
//! forked in its SIGCHLD handler run forever) is updated like any frame;
//! the signal frame and the context the signal interrupted (main in
//! `pause()`) stay where they are, main's frame is mapped in place, and its
//! call returns into the new version if the handler ever returns.

mod apply_support;

use apply_support::{build_c, with_version, TempDir};
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, Toolchain};

/// main waits in `pause()`; on SIGUSR1 the handler serves stdin lines
/// forever (`serve`: blocked in `read`), or, on "back", returns: main then
/// prints and ends.
const SERVER: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int served;

static void reply(const char *line)
{
    served++;
    printf("%s got %s (%d)\n", VERSION, line, served);
}

/* 1 when asked to go back, after serving lines. */
static int serve(void)
{
    char buf[64];
    int n = 0;
    char c;
    while (read(0, &c, 1) == 1) {
        if (c != '\n') {
            if (n < 63)
                buf[n++] = c;
            continue;
        }
        buf[n] = 0;
        n = 0;
        if (strcmp(buf, "back") == 0)
            return 1;
        reply(buf);
    }
    return 0;
}

static void on_usr1(int sig)
{
    (void)sig;
    printf("%s in handler\n", VERSION);
    if (!serve())
        _exit(0);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGUSR1, on_usr1);
    printf("%s ready\n", VERSION);
    pause();
    printf("%s main after pause, served %d\n", VERSION, served);
    return 0;
}
"#;

const WAIT: Duration = Duration::from_secs(20);

fn handler_updated(tc: Toolchain) {
    tc.require();
    let dir = TempDir::new(&format!("signal-frames-{tc}"));
    let v1 = build_c(&dir, "server_v1", &with_version(SERVER, "v1"), tc);
    let v2 = build_c(&dir, "server_v2", &with_version(SERVER, "v2"), tc);
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == "v1 ready")
        .expect("ready");
    std::thread::sleep(Duration::from_millis(50));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.pid() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("SIGUSR1");
    child
        .wait_for_line("in handler", WAIT, |l| l == "v1 in handler")
        .expect("handler");
    child.send_stdin(b"a\n").expect("line");
    child
        .wait_for_line("served", WAIT, |l| l == "v1 got a (1)")
        .expect("v1 serves");
    std::thread::sleep(Duration::from_millis(50));
    let opts = ApplyOptions {
        timeout: Duration::from_millis(10_000),
        ..ApplyOptions::default()
    };
    let report = apply(child.pid() as i32, &v2, &opts).expect("updated above the signal frame");
    let t = &report.threads[0];
    assert!(
        t.state
            .contains("interrupted in pause by the signal, left in place"),
        "{:?}",
        report.threads
    );
    let names: Vec<&str> = t
        .frames
        .iter()
        .map(|f| f.split('@').next().unwrap_or(""))
        .collect();
    assert_eq!(names, ["serve", "on_usr1", "main"], "{:?}", t.frames);
    // The handler's frames run v2's code; the count carried over.
    child.send_stdin(b"b\n").expect("line");
    child
        .wait_for_line("v2 serves", WAIT, |l| l == "v2 got b (2)")
        .expect("v2 serves");
    // The handler returns through the kept signal frame into pause's
    // caller: main, in v2.
    child.send_stdin(b"back\n").expect("back");
    let out = child.wait(WAIT).expect("ends");
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "v1 ready\nv1 in handler\nv1 got a (1)\nv2 got b (2)\nv2 main after pause, served 2\n"
    );
}

#[test]
fn a_handler_that_serves_forever_is_updated_above_its_signal_frame_gcc() {
    handler_updated(Toolchain::Gcc);
}

#[test]
fn a_handler_that_serves_forever_is_updated_above_its_signal_frame_clang() {
    handler_updated(Toolchain::Clang);
}
