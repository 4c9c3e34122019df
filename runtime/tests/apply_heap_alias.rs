//! Untyped aliases of heap objects that move, live (gcc and clang): a
//! `struct rec` that outgrows its block is held by a typed pointer
//! (`g_rec`) and also by a `void *` global (`g_any`), an integer global
//! holding its address (`g_int`) and one holding the address of a member
//! (`g_mid`).
//!
//! - default: the update goes through; the `void *` (typed walk) and the
//!   integer (sweep) are redirected to the new block and each is reported
//!   by name; the interior integer is reported as left unchanged; v2 sees
//!   one object through all three pointers. The report's per-type figures
//!   (through `upstare-apply --json`) match what the program allocated.
//! - `--strict`: refused naming the `void *` slot; the process goes on as
//!   v1, its heap use what it was (the new block freed again).
//! - the old block is freed after the update, and kept allocated with
//!   `--keep-old-heap-objects` (the program prints glibc's count of bytes
//!   in use, `mallinfo2().uordblks`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_instrumented, spawn, ChildGuard, TempDir, Toolchain};

const WAIT: Duration = Duration::from_secs(20);

/// v1's rec: 1,116 bytes; v2's: 2,316. Both are above glibc's per-thread
/// cache limit (1,032 bytes), so a freed block is no longer counted in
/// use by `mallinfo2`.
const REC_V1: u64 = 16 + 1100;
const REC_V2: u64 = REC_V1 + 1200;

fn program(ver: u32) -> String {
    let more = if ver == 1 { "" } else { "char more[1200];" };
    format!(
        r#"
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
struct rec {{ long id; long hits; char pad[1100]; {more} }};
struct rec *g_rec;
void *g_any;
uintptr_t g_int;
uintptr_t g_mid;
int main(void) {{
    struct timespec ts = {{0, 10000000}};
    g_rec = calloc(1, sizeof *g_rec);
    g_rec->id = 60;
    g_any = g_rec;
    g_int = (uintptr_t)g_rec;
    g_mid = (uintptr_t)&g_rec->hits;
    for (int t = 0; t < 3000; t++) {{
        struct mallinfo2 mi = mallinfo2();
        int same = g_any == (void *)g_rec && g_int == (uintptr_t)g_rec;
        g_rec->hits += 1;
        printf("v{ver} tick=%d id=%ld same=%d inuse=%zu\n", t, g_rec->id, same, mi.uordblks);
        fflush(stdout);
        nanosleep(&ts, NULL);
    }}
    return 0;
}}
"#
    )
}

/// The bytes glibc's chunk for a request of `n` bytes spans (what
/// `mallinfo2().uordblks` counts): `n` plus the 8-byte size field, rounded
/// up to 16, at least 32.
fn chunk(n: u64) -> u64 {
    ((n + 8 + 15) & !15).max(32)
}

/// Builds both versions, starts v1 and waits for its fourth tick: the
/// directory (kept while the test runs), v2, the process, that tick's line.
fn start_v1(tc: Toolchain) -> (TempDir, PathBuf, ChildGuard, String) {
    let dir = TempDir::new("apply-heap-alias");
    let build = |v: u32| {
        let name = format!("alias{v}.{}", tc.name());
        compile_instrumented(dir.path(), &name, &program(v), tc, &[])
    };
    let (v1, v2) = (build(1), build(2));
    let child = spawn(&v1, &[] as &[&str]).expect("spawn v1");
    let first = child
        .wait_for_line("ticking", WAIT, |l| l.starts_with("v1 tick=3 "))
        .expect("v1 ticks");
    (dir, v2, child, first)
}

/// `inuse=` of a line.
fn inuse(line: &str) -> u64 {
    line.rsplit_once(" inuse=")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("no inuse in {line:?}"))
}

/// Runs `upstare-apply --json ARGS` on `pid`; its parsed report.
fn cli_json(pid: u32, v2: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_upstare-apply"))
        .args(["--pid", &pid.to_string(), "--to"])
        .arg(v2)
        .args(["--json", "--timeout", "3000"])
        .args(args)
        .output()
        .expect("run upstare-apply");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "upstare-apply's output is no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The heap use v1 printed last, and v2's first line after an update.
fn around_update(child: &ChildGuard) -> (u64, String) {
    let v2 = child
        .wait_for_line("v2 runs", WAIT, |l| l.starts_with("v2 tick="))
        .expect("v2 ticks");
    let before = child
        .stdout_so_far()
        .lines()
        .rfind(|l| l.starts_with("v1 "))
        .map(inuse)
        .expect("a v1 line");
    (before, v2)
}

fn aliases_reported_and_redirected(tc: Toolchain) {
    let (_dir, v2, child, _) = start_v1(tc);
    let r = cli_json(child.pid(), &v2, &[]);
    assert_eq!(r["ok"], true, "[{tc}] {r}");
    let warnings: Vec<&str> = r["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .filter_map(|w| w.as_str())
        .collect();
    let has = |a: &str, b: &str| warnings.iter().any(|w| w.contains(a) && w.contains(b));
    assert!(
        has(
            "global g_any (void *) points at heap object struct rec",
            "redirected to"
        ),
        "[{tc}] {warnings:?}"
    );
    assert!(
        has(
            "(global g_int) points at heap object struct rec",
            "redirected to"
        ),
        "[{tc}] {warnings:?}"
    );
    assert!(
        has(
            "(global g_mid) points into heap object struct rec",
            "+8, which moves or changes layout: left unchanged"
        ),
        "[{tc}] {warnings:?}"
    );
    // One rec, moved; g_rec and g_any redirected by the typed walk, g_int
    // and g_mid found by the sweep.
    let rec = &r["heap_types"]["struct rec"];
    for (k, want) in [
        ("found", 1),
        ("converted_in_place", 0),
        ("moved", 1),
        ("pointers_redirected", 2),
        ("sweep_hits", 2),
    ] {
        assert_eq!(rec[k], want, "[{tc}] struct rec {k}: {r}");
    }
    assert_eq!(r["sweep"]["heap_aliases_redirected"], 1, "[{tc}] {r}");
    assert_eq!(r["sweep"]["heap_aliases_left"], 1, "[{tc}] {r}");
    // v2 reads one object through every pointer; the old block was freed.
    let (before, first) = around_update(&child);
    assert!(first.contains(" id=60 same=1 "), "[{tc}] {first}");
    assert_eq!(
        inuse(&first),
        before - chunk(REC_V1) + chunk(REC_V2),
        "[{tc}] {first}"
    );
}

#[test]
fn untyped_aliases_of_a_moved_object_are_reported_gcc() {
    aliases_reported_and_redirected(Toolchain::Gcc);
}

#[test]
fn untyped_aliases_of_a_moved_object_are_reported_clang() {
    aliases_reported_and_redirected(Toolchain::Clang);
}

#[test]
fn strict_refuses_untyped_aliases_of_a_moved_object() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let (_dir, v2, child, first) = start_v1(tc);
        let strict = ApplyOptions {
            strict: true,
            // Generous: the machine may be loaded.
            timeout: Duration::from_secs(10),
            ..ApplyOptions::default()
        };
        let err = apply(child.pid() as i32, &v2, &strict)
            .expect_err("--strict refuses untyped aliases")
            .to_string();
        assert!(
            err.contains("global g_any (void *)") && err.contains("--strict"),
            "[{tc}] {err}"
        );
        // The process goes on as v1, its heap use what it was.
        let seen = child.stdout_so_far().lines().count();
        let next = format!("v1 tick={} id=60 same=1 inuse={}", seen + 1, inuse(&first));
        child
            .wait_for_line("v1 continues", WAIT, |l| l == next)
            .unwrap_or_else(|e| panic!("[{tc}] {e}"));
    }
}

#[test]
fn old_blocks_of_moved_objects_kept_on_request() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let (_dir, v2, child, _) = start_v1(tc);
        let keep = ApplyOptions {
            keep_old_heap_objects: true,
            // Generous: the machine may be loaded.
            timeout: Duration::from_secs(10),
            ..ApplyOptions::default()
        };
        let r = apply(child.pid() as i32, &v2, &keep).unwrap_or_else(|e| panic!("[{tc}] {e}"));
        assert_eq!(r.heap_moved, 1, "[{tc}]");
        // The new block is allocated and the old one still is.
        let (before, first) = around_update(&child);
        assert!(first.contains(" id=60 same=1 "), "[{tc}] {first}");
        assert_eq!(inuse(&first), before + chunk(REC_V2), "[{tc}] {first}");
    }
}
