//! Handlers the program handed the C library before an update (`atexit`,
//! `on_exit`, `pthread_atfork`) run NEW's code afterwards: at the next
//! fork and at exit the lines are v2's, in the order glibc runs them. (The
//! old image's code is made non-executable at the commit: a handler left
//! pointing into it would crash the process at exit.)

mod apply_support;

use apply_support::build_c;
use apply_support::{with_version, TempDir};
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, Toolchain};

const HANDLERS: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static char tag[] = "tag";

static void bye(void)
{
    printf(VERSION " atexit bye\n");
}

static void bye_on(int status, void *arg)
{
    printf(VERSION " on_exit status %d arg %s\n", status, (char *)arg);
}

static void prepare(void)
{
    printf(VERSION " atfork prepare\n");
}

static void parent(void)
{
    printf(VERSION " atfork parent\n");
}

static void child(void)
{
    printf(VERSION " atfork child\n");
}

int main(void)
{
    char c;
    char line[32];
    int len = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    atexit(bye);
    on_exit(bye_on, tag);
    pthread_atfork(prepare, parent, child);
    printf(VERSION " ready\n");
    for (;;) {
        long n = read(0, &c, 1);
        if (n <= 0)
            break;
        if (c != '\n') {
            if (len < 31)
                line[len++] = c;
            continue;
        }
        line[len] = 0;
        len = 0;
        if (strcmp(line, "fork") == 0) {
            pid_t p = fork();
            if (p == 0)
                _exit(0);
            waitpid(p, NULL, 0);
            printf(VERSION " forked\n");
        } else if (strcmp(line, "quit") == 0) {
            break;
        }
    }
    return 0;
}
"#;

fn handlers_moved(tc: Toolchain) {
    tc.require();
    let dir = TempDir::new(&format!("handlers-{tc}"));
    let v1 = build_c(&dir, "handlers1", &with_version(HANDLERS, "v1"), tc);
    let v2 = build_c(&dir, "handlers2", &with_version(HANDLERS, "v2"), tc);
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    let wait = Duration::from_secs(20);
    child
        .wait_for_line("ready", wait, |l| l == "v1 ready")
        .expect("ready");
    std::thread::sleep(Duration::from_millis(100));
    let opts = ApplyOptions {
        timeout: Duration::from_secs(10),
        ..ApplyOptions::default()
    };
    let report =
        apply(child.pid() as i32, &v2, &opts).unwrap_or_else(|e| panic!("update failed: {e}"));
    // `atexit` stores OLD's `__dso_handle` with each handler: it becomes
    // NEW's, not a stale value.
    assert_eq!(report.sweep.stale, 0, "{:?}", report.warnings);
    // Nor is the updater's own scratch memory, gone by the sweep, said to
    // be memory the sweep could not read.
    assert!(
        !report.warnings.iter().any(|w| w.contains("could not read")),
        "{:?}",
        report.warnings
    );
    child.send_stdin(b"fork\n").expect("fork");
    child
        .wait_for_line("forked", wait, |l| l.ends_with(" forked"))
        .expect("forked");
    child.send_stdin(b"quit\n").expect("quit");
    let out = child.wait(wait).expect("ends");
    assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    let mut lines: Vec<&str> = out.stdout.lines().collect();
    // The child's line comes from another process: its place among the
    // parent's is not fixed.
    let in_child = lines.iter().position(|l| l.ends_with("atfork child"));
    assert_eq!(
        in_child.map(|i| lines.remove(i)),
        Some("v2 atfork child"),
        "{}",
        out.stdout
    );
    assert_eq!(
        lines,
        [
            "v1 ready",
            "v2 atfork prepare",
            "v2 atfork parent",
            "v2 forked",
            "v2 on_exit status 0 arg tag",
            "v2 atexit bye",
        ],
        "{}",
        out.stdout
    );
}

#[test]
fn exit_and_fork_handlers_run_the_new_version_gcc() {
    handlers_moved(Toolchain::Gcc);
}

#[test]
fn exit_and_fork_handlers_run_the_new_version_clang() {
    handlers_moved(Toolchain::Clang);
}
