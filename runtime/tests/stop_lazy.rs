//! Lazy arming (`int3` mode, programs of at least `LAZY_FROM_POINTS`
//! points): a stop arms the points of the functions active in some thread
//! and the entries of what they call or may call through a pointer; every
//! point only if threads still run after `ESCALATE_AFTER`.
//! - which functions a program takes the address of, read from its file
//!   (PIE and position-dependent, gcc and clang);
//! - a busy thread is stopped with a few points armed, not all of them;
//! - a busy thread the first points miss (fault injected: none armed) is
//!   stopped all the same, once every point is armed.

mod apply_support;

use apply_support::{build_c, with_version, TempDir};
use object::{Object, ObjectSymbol};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use upstare_runtime::stop::lazy::{address_taken, LAZY_FROM_POINTS};
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_c, spawn, CSource, Toolchain};

/// A busy program of many functions. `main spin` runs `spin` (called
/// directly); `main hidden D` calls `hidden` through `main`'s address plus
/// `D`, a pointer no instruction or datum of the file forms. Functions
/// reached through pointers the program forms: a signal handler, a qsort
/// callback, an entry of a table in data, a thread's start routine.
fn source(fillers: usize) -> String {
    let mut s = String::from(
        r#"
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile long sink;

static void on_signal(int s)
{
    sink += s;
}

static int cmp(const void *a, const void *b)
{
    return *(const int *)a - *(const int *)b;
}

static void tabled(int x)
{
    sink += x;
}

static void (*table[])(int) = {tabled};

static void *start(void *arg)
{
    sink += (long)arg;
    return NULL;
}

static long plain(long x)
{
    return x + 1;
}

static long spin(long n)
{
    for (long i = 0;; i++) {
        for (volatile int k = 0; k < 100; k++)
            n += k;
        if ((i & 0x3ffff) == 0) {
            printf("%s spin %ld\n", VERSION, i);
            fflush(stdout);
        }
    }
    return n;
}

static long hidden(long n)
{
    for (long i = 0;; i++) {
        for (volatile int k = 0; k < 100; k++)
            n += k;
        if ((i & 0x3ffff) == 0) {
            printf("%s hidden %ld\n", VERSION, i);
            fflush(stdout);
        }
    }
    return n;
}

long fill_all(long x);

int main(int argc, char **argv)
{
    int v[3] = {3, 1, 2};
    pthread_t t;
    signal(SIGUSR2, on_signal);
    qsort(v, 3, sizeof v[0], cmp);
    table[0](v[0]);
    if (pthread_create(&t, NULL, start, (void *)1) == 0)
        pthread_join(t, NULL);
    sink += plain(fill_all(v[0]));
    printf("%s ready\n", VERSION);
    fflush(stdout);
    if (argc > 2 && strcmp(argv[1], "hidden") == 0) {
        uintptr_t at = (uintptr_t)main + (uintptr_t)strtoll(argv[2], NULL, 0);
        return (int)((long (*)(long))at)(0);
    }
    return (int)spin(0);
}
"#,
    );
    for i in 0..fillers {
        s.push_str(&format!(
            "long filler{i}(long x)\n{{\n    return x * {i} + 1;\n}}\n"
        ));
    }
    s.push_str("long fill_all(long x)\n{\n");
    for i in 0..fillers {
        s.push_str(&format!("    x = filler{i}(x);\n"));
    }
    s.push_str("    return x;\n}\n");
    s
}

/// Function symbols of `bin`: name → link-time address.
fn functions(bin: &Path) -> HashMap<String, u64> {
    let bytes = std::fs::read(bin).expect("read");
    let file = object::File::parse(&*bytes).expect("parse");
    file.symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text && s.address() != 0)
        .filter_map(|s| Some((s.name().ok()?.to_string(), s.address())))
        .collect()
}

fn taken_names(bin: &Path) -> Vec<String> {
    let fns = functions(bin);
    let names: Vec<&String> = fns.keys().collect();
    let entries: HashMap<u64, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (fns[*n], i))
        .collect();
    let bytes = std::fs::read(bin).expect("read");
    let mut out: Vec<String> = address_taken(&bytes, &entries)
        .into_iter()
        .map(|i| names[i].clone())
        .collect();
    out.sort();
    out
}

fn address_taken_is_read_from_the_file(tc: Toolchain, flags: &[&str]) {
    tc.require();
    let dir = TempDir::new(&format!("lazy-taken-{tc}-{}", flags.len()));
    let bin = compile_c(
        CSource::Text(&with_version(&source(8), "v1")),
        tc,
        flags,
        &dir.path().join("prog"),
    )
    .expect("compile");
    let taken = taken_names(&bin);
    for f in ["on_signal", "cmp", "tabled", "start", "main"] {
        assert!(taken.iter().any(|t| t == f), "{f} not found in {taken:?}");
    }
    // Called directly only, or through a pointer formed at run time.
    for f in ["plain", "spin", "hidden", "filler3", "fill_all"] {
        assert!(!taken.iter().any(|t| t == f), "{f} found in {taken:?}");
    }
}

#[test]
fn address_taken_functions_are_read_from_a_pie_gcc() {
    address_taken_is_read_from_the_file(Toolchain::Gcc, &[]);
}

#[test]
fn address_taken_functions_are_read_from_a_pie_clang() {
    address_taken_is_read_from_the_file(Toolchain::Clang, &[]);
}

#[test]
fn address_taken_functions_are_read_from_a_position_dependent_gcc() {
    address_taken_is_read_from_the_file(Toolchain::Gcc, &["-no-pie", "-fno-pie"]);
}

const WAIT: Duration = Duration::from_secs(20);
/// Enough functions for lazy arming.
const FILLERS: usize = LAZY_FROM_POINTS + 100;

/// Updates a busy `main spin` (its process given `env`); the points of
/// the program and how many were armed.
fn update_busy(env: &[(&str, &str)]) -> (usize, u64) {
    let tc = Toolchain::Gcc;
    tc.require();
    let dir = TempDir::new(&format!("lazy-busy-{}", env.len()));
    let v1 = build_c(&dir, "v1", &with_version(&source(FILLERS), "v1"), tc);
    let v2 = build_c(&dir, "v2", &with_version(&source(FILLERS), "v2"), tc);
    let child = spawn(&v1, &["spin"]).expect("spawn");
    child
        .wait_for_line("busy", WAIT, |l| l.starts_with("v1 spin "))
        .expect("busy");
    let opts = ApplyOptions {
        timeout: Duration::from_millis(10_000),
        ..ApplyOptions::default()
    };
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let report = apply(child.pid() as i32, &v2, &opts);
    for (k, _) in env {
        std::env::remove_var(k);
    }
    let report = report.unwrap_or_else(|e| panic!("update: {e}"));
    // The busy loop goes on in v2.
    child
        .wait_for_line("after", WAIT, |l| l.starts_with("v2 spin "))
        .expect("v2 runs the loop");
    let points = apply_support::update_points(&v1).len();
    (points, report.timings.stop_detail.points_armed)
}

#[test]
fn a_busy_thread_is_stopped_with_a_few_points_armed() {
    let (points, armed) = update_busy(&[]);
    assert!(points >= LAZY_FROM_POINTS, "{points} points");
    // spin's points, main's and the entries of what they call or whose
    // address is taken: a few dozen at most.
    assert!(armed > 0 && armed < 64, "{armed} of {points} armed");
}

#[test]
fn a_thread_the_first_points_miss_is_stopped_once_every_point_is_armed() {
    // Fault injected: the first arming arms nothing.
    let (points, armed) = update_busy(&[("UPSTARE_TEST_LAZY_FIRST", "none")]);
    assert_eq!(armed as usize, points, "every point armed in the end");
}
