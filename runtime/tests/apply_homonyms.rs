//! Functions of one name in two units (PostgreSQL's external `check_role`
//! of `variable.c`, the GUC table's check hook, and the static one of
//! `hba.c`): a pointer to either, in a global table, in a global of its
//! own unit or in the heap, still calls the same function after an
//! identity update. Before, pointers were mapped by name alone and both
//! went to one of them (PostgreSQL's new backends then crashed in the
//! wrong `check_role`).

mod apply_support;

use apply_support::{fresh_copy, TempDir};
use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_files, instrument_to, spawn, ChildGuard, Toolchain};

/// The external `check`: adds 1000.
const UNIT_A: &str = r#"
int check(int x)
{
    return x + 1000;
}
"#;

/// The static `check` of another unit: doubles; handed out through a
/// global of its unit and a getter.
const UNIT_B: &str = r#"
static int check(int x)
{
    return x * 2;
}

int (*b_hook)(int) = check;

int (*b_check(void))(int)
{
    return check;
}
"#;

/// `c` prints what every pointer returns for 5; `q` ends.
const MAIN: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int check(int x);
extern int (*b_hook)(int);
int (*b_check(void))(int);

struct hook {
    const char *name;
    int (*fn)(int);
};

/* Like PostgreSQL's GUC tables: the external one by initializer, the
 * static one stored at start. */
struct hook table[] = {{"a", check}, {"b", 0}};

int main(void)
{
    char command;
    struct hook *heap = malloc(2 * sizeof *heap);
    setvbuf(stdout, NULL, _IOLBF, 0);
    table[1].fn = b_check();
    memcpy(heap, table, 2 * sizeof *heap);
    printf("ready\n");
    /* One byte a command: c(all) or q(uit). */
    while (read(0, &command, 1) == 1 && command != 'q') {
        if (command == 'c')
            printf("table a=%d b=%d heap a=%d b=%d hook b=%d\n", table[0].fn(5),
                   table[1].fn(5), heap[0].fn(5), heap[1].fn(5), b_hook(5));
    }
    free(heap);
    return 0;
}
"#;

const WAIT: Duration = Duration::from_secs(20);
/// What `call` prints: each pointer calls its own unit's `check`.
const CALLED: &str = "table a=1005 b=10 heap a=1005 b=10 hook b=10";

/// The three units compiled with `tc` and instrumented; `b_first` links
/// the static `check` before the external one.
fn build(dir: &TempDir, tc: Toolchain, b_first: bool) -> PathBuf {
    let write = |name: &str, text: &str| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {name}: {e}"));
        p
    };
    let (a, b, m) = (
        write("unit_a.c", UNIT_A),
        write("unit_b.c", UNIT_B),
        write("main.c", MAIN),
    );
    let sources: Vec<&Path> = if b_first {
        vec![&m, &b, &a]
    } else {
        vec![&m, &a, &b]
    };
    let exe = dir.join("homonyms");
    compile_files(tc, &sources, &[], &[], &exe).unwrap_or_else(|e| panic!("compile: {e}"));
    instrument_to(&exe, &dir.join("homonyms.up"))
}

fn call(child: &mut ChildGuard, n: usize, what: &str) {
    child.send_stdin(b"c").expect("send");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = child.stdout_so_far();
        let answers: Vec<&str> = out.lines().filter(|l| l.starts_with("table ")).collect();
        if let Some(got) = answers.get(n) {
            assert_eq!(*got, CALLED, "{what}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer {what}: {out}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn pointers_keep_their_unit(tc: Toolchain, b_first: bool) {
    tc.require();
    let dir = TempDir::new(&format!("homonyms-{tc}-{b_first}"));
    let up = build(&dir, tc, b_first);
    let mut child = spawn(&up, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == "ready")
        .expect("ready");
    call(&mut child, 0, "before the update");
    let opts = ApplyOptions {
        timeout: Duration::from_millis(10_000),
        ..ApplyOptions::default()
    };
    apply(
        child.pid() as i32,
        &fresh_copy(&up, &dir, "identity"),
        &opts,
    )
    .unwrap_or_else(|e| panic!("update: {e}"));
    call(&mut child, 1, "after the update");
    child.send_stdin(b"q").expect("quit");
    let out = child.wait(WAIT).expect("ends");
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
}

#[test]
fn pointers_to_homonym_functions_keep_their_unit_gcc() {
    pointers_keep_their_unit(Toolchain::Gcc, false);
    pointers_keep_their_unit(Toolchain::Gcc, true);
}

#[test]
fn pointers_to_homonym_functions_keep_their_unit_clang() {
    pointers_keep_their_unit(Toolchain::Clang, false);
    pointers_keep_their_unit(Toolchain::Clang, true);
}
