//! `environ` stays one array for the C library and the running version:
//! NEW has its own copy of `environ` (a COPY relocation; its code reads it
//! PC-relative), filled from the live one, and the commit points the C
//! library's slots at NEW's copy, so a `setenv` in the new version is seen
//! by its own code reading `environ`; and a second update takes the live
//! copy from where the library's slots point (the previous version's), not
//! from the first executable's stale one.

mod apply_support;

use apply_support::{build_c, fresh_copy, with_version, TempDir};
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, ChildGuard, Toolchain};

/// Commands on stdin: `set NAME VALUE` (setenv), `get NAME` (prints the
/// value found by scanning `environ` itself, or `unset`), `quit`.
const ENV: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

static const char *scan(const char *name)
{
    size_t n = strlen(name);
    for (char **e = environ; e && *e; e++)
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=')
            return *e + n + 1;
    return "unset";
}

/* One line of stdin into buf (without the newline); 0 at end of input. */
static int read_line(char *buf, int cap)
{
    int n = 0;
    char c;
    while (read(0, &c, 1) == 1) {
        if (c == '\n') {
            buf[n] = 0;
            return 1;
        }
        if (n < cap - 1)
            buf[n++] = c;
    }
    return 0;
}

int main(void)
{
    char line[128], name[64], value[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("%s ready\n", VERSION);
    while (read_line(line, sizeof line)) {
        if (sscanf(line, "set %63s %63s", name, value) == 2)
            setenv(name, value, 1);
        else if (sscanf(line, "get %63s", name) == 1)
            printf("%s %s=%s\n", VERSION, name, scan(name));
        else if (strcmp(line, "quit") == 0)
            break;
    }
    return 0;
}
"#;

const WAIT: Duration = Duration::from_secs(20);

/// Sends `cmd` and checks the next line the program prints.
fn ask(child: &mut ChildGuard, cmd: &str, want: &str) {
    let before = child.stdout_so_far().lines().count();
    child
        .send_stdin(format!("{cmd}\n").as_bytes())
        .expect("send");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = child.stdout_so_far();
        if let Some(got) = out.lines().nth(before) {
            assert_eq!(got, want, "after {cmd:?}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer to {cmd:?}: {out}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn update(child: &ChildGuard, to: &std::path::Path) {
    let opts = ApplyOptions {
        timeout: Duration::from_millis(10_000),
        ..ApplyOptions::default()
    };
    apply(child.pid() as i32, to, &opts).unwrap_or_else(|e| panic!("update: {e}"));
}

fn environ_is_one_array(tc: Toolchain) {
    tc.require();
    let dir = TempDir::new(&format!("environ-{tc}"));
    let v1 = build_c(&dir, "env_v1", &with_version(ENV, "v1"), tc);
    let v2 = build_c(&dir, "env_v2", &with_version(ENV, "v2"), tc);
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == "v1 ready")
        .expect("ready");
    child.send_stdin(b"set A 1\n").expect("send");
    ask(&mut child, "get A", "v1 A=1");
    update(&child, &fresh_copy(&v2, &dir, "v2"));
    ask(&mut child, "get A", "v2 A=1");
    // A new variable: setenv gives the library a new array, through the
    // slot that now points at NEW's environ.
    child.send_stdin(b"set B 2\n").expect("send");
    ask(&mut child, "get B", "v2 B=2");
    // A second update fills its copy from the live one (v2's).
    update(&child, &fresh_copy(&v1, &dir, "v1-again"));
    ask(&mut child, "get B", "v1 B=2");
    child.send_stdin(b"set C 3\n").expect("send");
    ask(&mut child, "get C", "v1 C=3");
    ask(&mut child, "get A", "v1 A=1");
    child.send_stdin(b"quit\n").expect("quit");
    let out = child.wait(WAIT).expect("ends");
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
}

#[test]
fn environ_is_one_array_for_the_library_and_the_new_version_gcc() {
    environ_is_one_array(Toolchain::Gcc);
}

#[test]
fn environ_is_one_array_for_the_library_and_the_new_version_clang() {
    environ_is_one_array(Toolchain::Clang);
}
