//! A library loaded after an update binds to the running version: the
//! dynamic linker looks the main program's exported symbols up in the
//! first version's `.dynsym` (PostgreSQL's backends, forked after the
//! update, `dlopen` PL/pgSQL, which calls the server's functions and uses
//! its variables). The commit points those symbols at NEW's, so the
//! library reads NEW's variable (the live state) and calls NEW's code.
//! Before, it bound to the old image: its variable frozen at the update,
//! its code no longer executable.

mod apply_support;

use apply_support::{fresh_copy, TempDir};
use std::path::PathBuf;
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_files, instrument_to, spawn, ChildGuard, Toolchain};

/// The library: reads the program's `counter` and calls its `twice`.
const LIBRARY: &str = r#"
extern int counter;
int twice(int x);

int plugin_report(void)
{
    return twice(counter);
}
"#;

/// `i` adds one to `counter`; `l` loads the library (its path is
/// `argv[1]`) and prints what it reports; `q` ends.
const MAIN: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>

int counter;

int twice(int x)
{
    return 2 * x;
}

int main(int argc, char **argv)
{
    char command;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2)
        return 2;
    printf("ready\n");
    while (read(0, &command, 1) == 1 && command != 'q') {
        if (command == 'i') {
            counter++;
            printf("counter %d\n", counter);
        } else if (command == 'l') {
            void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
            int (*report)(void) = lib ? (int (*)(void))dlsym(lib, "plugin_report") : 0;
            if (report)
                printf("plugin %d\n", report());
            else
                printf("plugin error %s\n", dlerror());
        }
    }
    return 0;
}
"#;

const WAIT: Duration = Duration::from_secs(20);

/// The program (exporting its symbols, as PostgreSQL's server does) and
/// the library, built with `tc`; the program instrumented.
fn build(dir: &TempDir, tc: Toolchain) -> (PathBuf, PathBuf) {
    let write = |name: &str, text: &str| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {name}: {e}"));
        p
    };
    let main = write("main.c", MAIN);
    let lib = write("plugin.c", LIBRARY);
    let exe = dir.join("host");
    compile_files(tc, &[&main], &["-rdynamic"], &[], &exe)
        .unwrap_or_else(|e| panic!("compile the program: {e}"));
    let so = dir.join("plugin.so");
    compile_files(tc, &[&lib], &["-shared", "-fPIC"], &[], &so)
        .unwrap_or_else(|e| panic!("compile the library: {e}"));
    (instrument_to(&exe, &dir.join("host.up")), so)
}

/// Sends `command` and waits for the line `want` (each test's lines are
/// all different).
fn expect(child: &mut ChildGuard, command: &[u8], want: &str, what: &str) {
    child.send_stdin(command).expect("send");
    child
        .wait_for_line(want, WAIT, |l| l == want)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

fn library_loaded_after_the_update_binds_to_it(tc: Toolchain) {
    tc.require();
    let dir = TempDir::new(&format!("dlopen-after-{tc}"));
    let (up, so) = build(&dir, tc);
    let so_arg = so.to_string_lossy().into_owned();
    let mut child = spawn(&up, &[so_arg.as_str()]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == "ready")
        .expect("ready");
    expect(&mut child, b"i", "counter 1", "before the update");
    expect(&mut child, b"i", "counter 2", "before the update");
    let opts = ApplyOptions {
        timeout: Duration::from_millis(10_000),
        ..ApplyOptions::default()
    };
    let copy = fresh_copy(&up, &dir, "identity");
    apply(child.pid() as i32, &copy, &opts).unwrap_or_else(|e| panic!("update: {e}"));
    expect(&mut child, b"i", "counter 3", "after the update");
    // The library sees the live counter (3) through the running version.
    expect(
        &mut child,
        b"l",
        "plugin 6",
        "the library loaded after the update",
    );
    child.send_stdin(b"q").expect("quit");
    let out = child.wait(WAIT).expect("ends");
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
}

#[test]
fn a_library_loaded_after_the_update_binds_to_the_new_version_gcc() {
    library_loaded_after_the_update_binds_to_it(Toolchain::Gcc);
}

#[test]
fn a_library_loaded_after_the_update_binds_to_the_new_version_clang() {
    library_loaded_after_the_update_binds_to_it(Toolchain::Clang);
}
