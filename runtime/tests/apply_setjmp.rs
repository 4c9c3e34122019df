//! Error recovery through `setjmp`/`longjmp` after an update (PostgreSQL's
//! `PG_exception_stack`: `PostgresMain` calls `sigsetjmp` on a local once,
//! and every later `ereport(ERROR)` jumps back there). glibc keeps the
//! return address of the `setjmp` call, with the stack and frame pointers,
//! mangled in the `jmp_buf`, where neither the typed walk nor the plain
//! sweep sees a pointer into the old image. Before, the first error after
//! a reported success jumped into the retired, non-executable code and
//! the process died (SIGSEGV); the live-updated PostgreSQL backend did on
//! its first `SELECT 1/0`.
//!
//! The program keeps a `sigjmp_buf` in `main`'s frame (reached through a
//! global pointer) and a `jmp_buf` on the heap set by a function active
//! below `main`; after the update both jumps land in the new version's
//! code, with the frame's values kept.

mod apply_support;

use apply_support::{build_c, send_and_expect, with_version, TempDir};
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, Toolchain};

/// One byte a command: `e` raises an error caught in `main` (siglongjmp),
/// `E` one caught in `serve` (longjmp through a heap `jmp_buf`), `p`
/// answers, `q` ends.
const SRC: &str = r#"
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static sigjmp_buf *exception_stack;
static int errors;

static void raise_error(void)
{
    siglongjmp(*exception_stack, 1);
}

static int serve(jmp_buf *inner)
{
#ifdef WIDER
    long wider[5];
#endif
    char command;
    int caught = 0;
    if (setjmp(*inner) != 0) {
        caught++;
        printf("%s serve recovered %d\n", VERSION, caught);
    }
    while (read(0, &command, 1) == 1 && command != 'q') {
        if (command == 'e')
            raise_error();
        if (command == 'E')
            longjmp(*inner, 1);
        if (command == 'p')
            printf("%s pong errors=%d caught=%d\n", VERSION, errors, caught);
    }
    return caught;
}

int main(void)
{
#ifdef WIDER
    long wider[7];
#endif
    sigjmp_buf local;
    jmp_buf *inner = malloc(sizeof *inner);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (sigsetjmp(local, 1) != 0) {
        errors++;
        printf("%s recovered %d\n", VERSION, errors);
    }
    exception_stack = &local;
    printf("%s ready\n", VERSION);
    serve(inner);
    free(inner);
    return 0;
}
"#;

const WAIT: Duration = Duration::from_secs(20);

/// `wider`: NEW's `main` and `serve` have a larger frame (a new local
/// array below the others): the frames holding the `jmp_buf`s and the
/// state they saved are rebuilt variable by variable at other addresses.
fn errors_after_an_update_land_in_the_new_code(tc: Toolchain, wider: bool) {
    tc.require();
    let dir = TempDir::new(&format!("setjmp-{tc}-{wider}"));
    let v1 = build_c(&dir, "v1", &with_version(SRC, "v1"), tc);
    let new_src = with_version(SRC, "v2");
    let new_src = if wider {
        format!("#define WIDER\n{new_src}")
    } else {
        new_src
    };
    let v2 = build_c(&dir, "v2", &new_src, tc);
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == "v1 ready")
        .expect("ready");
    send_and_expect(
        &mut child,
        b"e",
        &["v1 recovered 1"],
        WAIT,
        "before the update",
    );
    send_and_expect(
        &mut child,
        b"E",
        &["v1 serve recovered 1"],
        WAIT,
        "before the update",
    );
    let opts = ApplyOptions {
        timeout: Duration::from_millis(10_000),
        strict: true,
        ..ApplyOptions::default()
    };
    let report = apply(child.pid() as i32, &v2, &opts).unwrap_or_else(|e| panic!("update: {e}"));
    assert!(
        !report.warnings.iter().any(|w| w.contains("jmp_buf")),
        "{:?}",
        report.warnings
    );
    send_and_expect(
        &mut child,
        b"p",
        &["v2 pong errors=1 caught=1"],
        WAIT,
        "after the update",
    );
    // The frames' values came along: the counts go on.
    send_and_expect(
        &mut child,
        b"E",
        &["v2 serve recovered 2"],
        WAIT,
        "heap jmp_buf after the update",
    );
    send_and_expect(
        &mut child,
        b"e",
        &["v2 recovered 2"],
        WAIT,
        "main's sigjmp_buf after the update",
    );
    send_and_expect(
        &mut child,
        b"p",
        &["v2 pong errors=2 caught=0"],
        WAIT,
        "after both errors",
    );
    child.send_stdin(b"q").expect("quit");
    let out = child.wait(WAIT).expect("ends");
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
}

#[test]
fn errors_after_an_update_land_in_the_new_code_gcc() {
    errors_after_an_update_land_in_the_new_code(Toolchain::Gcc, false);
}

#[test]
fn errors_after_an_update_land_in_the_new_code_clang() {
    errors_after_an_update_land_in_the_new_code(Toolchain::Clang, false);
}

#[test]
fn errors_land_in_new_frames_of_another_layout_gcc() {
    errors_after_an_update_land_in_the_new_code(Toolchain::Gcc, true);
}

#[test]
fn errors_land_in_new_frames_of_another_layout_clang() {
    errors_after_an_update_land_in_the_new_code(Toolchain::Clang, true);
}
