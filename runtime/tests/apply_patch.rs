//! `upstare-apply --pid PID PATCH`: a PATCH made by `upstare-patch` applies
//! a real update with changes of type (a global struct gains a member, an
//! int widens, an array grows), and is refused with the process untouched
//! when it was made for another OLD, is corrupt or is incomplete; `--to NEW`
//! refuses where `upstare-patch` says the user is needed.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use upstare_patcher::patchfile;
use upstare_testkit::{
    compile_instrumented, run_command, spawn, ChildGuard, Output, TempDir, Toolchain,
};

const WAIT: Duration = Duration::from_secs(20);

/// v1 counts: each tick `i`, `hits -= 1`, `sess.bytes += i`,
/// `history[i % 4] += 10`.
const V1: &str = r#"
#include <stdio.h>
#include <unistd.h>
struct session { int id; long bytes; };
struct session sess = { 7, 100 };
int hits = -5;
int history[4] = {1, 2, 3, 4};
long dropped = 5;
long wild = 3;
int main(void) {
    for (int i = 0; i < 3000; i++) {
        hits -= 1; sess.bytes += i; history[i % 4] += 10; dropped += wild;
        printf("v1 i=%d hits=%d bytes=%ld\n", i, hits, sess.bytes);
        fflush(stdout);
        usleep(10000);
    }
    return 0;
}
"#;

/// v2: `struct session` gains `flags` (initializer 99), `hits` becomes a
/// long, `history` grows to 6 (new elements 50, 60), `dropped` is gone and
/// `added` is new; the loop does the same and prints all of it.
const V2: &str = r#"
#include <stdio.h>
#include <unistd.h>
struct session { int id; long bytes; long flags; };
struct session sess = { 7, 100, 99 };
long hits = -5;
int history[6] = {1, 2, 3, 4, 50, 60};
long added = 11;
long wild = 3;
int main(void) {
    for (int i = 0; i < 3000; i++) {
        hits -= 1; sess.bytes += i; history[i % 4] += 10; added += wild - 3;
        printf("v2 i=%d hits=%ld bytes=%ld flags=%ld id=%d h0=%d h4=%d h5=%d added=%ld\n",
               i, hits, sess.bytes, sess.flags, sess.id, history[0], history[4], history[5], added);
        fflush(stdout);
        usleep(10000);
    }
    return 0;
}
"#;

/// v2 where `dropped`, which v1 writes, changes meaning (long → long *):
/// needs the user. (`wild`, which v1 never writes, would follow NEW's
/// initial value instead: data the program never changed needs nothing.)
const V2_MEANING: &str = r#"
#include <stdio.h>
#include <unistd.h>
struct session { int id; long bytes; long flags; };
struct session sess = { 7, 100, 99 };
long hits = -5;
int history[6] = {1, 2, 3, 4, 50, 60};
long wild = 3;
long *dropped;
int main(void) {
    for (int i = 0; i < 3000; i++) {
        hits -= 1; sess.bytes += i; history[i % 4] += 10;
        printf("v2 i=%d hits=%ld dropped=%ld\n", i, hits, dropped ? *dropped : -1);
        fflush(stdout);
        usleep(10000);
    }
    return 0;
}
"#;

fn build(dir: &TempDir, name: &str, src: &str, tc: Toolchain) -> PathBuf {
    compile_instrumented(dir.path(), &format!("{name}.{}", tc.name()), src, tc, &[])
}

fn tool(exe: &str, args: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    run_command(cmd, Duration::from_secs(60)).expect("run tool")
}

/// What `upstare-patch OLD NEW -o OUT` does (its binary belongs to another
/// package): the PATCH is written, complete or not; whether it is complete.
fn make_patch(old: &Path, new: &Path, out: &Path) -> bool {
    let (patch, _) = patchfile::make_patch(old, new).expect("make PATCH");
    patchfile::write_patch(out, &patch).expect("write PATCH");
    patch.is_complete()
}

fn apply_patch(pid: u32, patch: &Path) -> Output {
    let pid = pid.to_string();
    tool(
        env!("CARGO_BIN_EXE_upstare-apply"),
        &["--pid".as_ref(), pid.as_ref(), patch.as_ref()],
    )
}

/// `key=<number>` in `line`.
fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn wait_tick(child: &ChildGuard, prefix: &'static str, at_least: i64) -> String {
    child
        .wait_for_line("a tick", WAIT, |l| {
            l.starts_with(prefix) && l.contains("i=") && field(l, "i") >= at_least
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", child.stdout_so_far()))
}

fn patch_applies(tc: Toolchain) {
    let dir = TempDir::new("apply-patch");
    let (v1, v2) = (build(&dir, "v1", V1, tc), build(&dir, "v2", V2, tc));
    let patch = dir.join("v1-v2.patch");
    assert!(make_patch(&v1, &v2, &patch), "nothing needs the user");

    let child = spawn(&v1, &[] as &[&str]).expect("spawn v1");
    wait_tick(&child, "v1 ", 5);
    let out = apply_patch(child.pid(), &patch);
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("updated process"), "{}", out.stdout);
    let first = wait_tick(&child, "v2 ", 0);
    let k = field(&first, "i");
    // Every value follows from the source: v1's state after ticks 0..k-1,
    // then v2's tick k.
    assert_eq!(
        field(&first, "hits"),
        -5 - (k + 1),
        "int → long keeps the negative count: {first}"
    );
    assert_eq!(
        field(&first, "bytes"),
        100 + k * (k + 1) / 2,
        "sess.bytes carried over: {first}"
    );
    assert_eq!(field(&first, "id"), 7, "{first}");
    assert_eq!(
        field(&first, "flags"),
        99,
        "a new member of a global takes NEW's initializer: {first}"
    );
    // history[0] was written by v1 (prefix kept), the new elements are
    // NEW's.
    assert_eq!(field(&first, "h0"), 1 + 10 * (k / 4 + 1), "{first}");
    assert_eq!(
        (field(&first, "h4"), field(&first, "h5")),
        (50, 60),
        "{first}"
    );
    assert_eq!(
        field(&first, "added"),
        11,
        "a new global starts with its initial value: {first}"
    );
    // The last v1 tick was k-1: nothing skipped, nothing repeated.
    let so_far = child.stdout_so_far();
    let last_v1 = so_far
        .lines()
        .rfind(|l| l.starts_with("v1 "))
        .expect("v1 ticks");
    assert_eq!(field(last_v1, "i"), k - 1, "{so_far}");
}

#[test]
fn a_patch_applies_a_typed_update_gcc() {
    patch_applies(Toolchain::Gcc);
}

#[test]
fn a_patch_applies_a_typed_update_clang() {
    patch_applies(Toolchain::Clang);
}

/// What must not change when an update is refused: the mappings and the
/// bytes of every executable mapping of the program.
fn snapshot(pid: u32, program: &Path) -> (String, Vec<u8>) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let name = program.display().to_string();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    let mut code = Vec::new();
    for line in maps.lines().filter(|l| l.ends_with(&name)) {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.contains('x') {
            continue;
        }
        let (a, b) = range.split_once('-').expect("range");
        let a = u64::from_str_radix(a, 16).expect("start");
        let b = u64::from_str_radix(b, 16).expect("end");
        let mut buf = vec![0u8; (b - a) as usize];
        mem.seek(SeekFrom::Start(a)).expect("seek");
        mem.read_exact(&mut buf).expect("read code");
        code.extend_from_slice(&buf);
    }
    assert!(!code.is_empty(), "no code of {name} in\n{maps}");
    (maps, code)
}

/// The program goes on with its own sequence: v1 ticks only, consecutive.
fn keeps_its_sequence(child: &ChildGuard, from: i64) {
    wait_tick(child, "v1 ", from + 3);
    let out = child.stdout_so_far();
    let ticks: Vec<i64> = out
        .lines()
        .map(|l| {
            assert!(l.starts_with("v1 "), "not v1's output: {l}");
            field(l, "i")
        })
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks skipped or repeated:\n{out}"
    );
}

fn refused_untouched(child: &ChildGuard, v1: &Path, patch: &Path, expect: &[&str]) {
    let last = field(&wait_tick(child, "v1 ", 3), "i");
    let before = snapshot(child.pid(), v1);
    let out = apply_patch(child.pid(), patch);
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    for e in expect {
        assert!(out.stderr.contains(e), "no {e:?} in {}", out.stderr);
    }
    let after = snapshot(child.pid(), v1);
    assert_eq!(before.0, after.0, "the mappings changed");
    assert!(before.1 == after.1, "the code bytes changed");
    keeps_its_sequence(child, last);
}

#[test]
fn refusals_leave_the_process_untouched() {
    let tc = Toolchain::Gcc;
    let dir = TempDir::new("apply-patch-refused");
    let (v1, v2) = (build(&dir, "v1", V1, tc), build(&dir, "v2", V2, tc));
    // Another OLD: the same program with another initial count.
    let other = build(&dir, "other", &V1.replace("hits = -5", "hits = -7"), tc);
    let other_patch = dir.join("other.patch");
    assert!(make_patch(&other, &v2, &other_patch));
    // A corrupt PATCH: one byte of a good one changed.
    let good = dir.join("good.patch");
    assert!(make_patch(&v1, &v2, &good));
    let mut bytes = std::fs::read(&good).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let corrupt = dir.join("corrupt.patch");
    std::fs::write(&corrupt, &bytes).expect("write");
    // An incomplete PATCH: `dropped` changes meaning.
    let v2m = build(&dir, "v2m", V2_MEANING, tc);
    let incomplete = dir.join("incomplete.patch");
    assert!(
        !make_patch(&v1, &v2m, &incomplete),
        "dropped needs the user"
    );

    let child = spawn(&v1, &[] as &[&str]).expect("spawn v1");
    refused_untouched(
        &child,
        &v1,
        &other_patch,
        &[
            "not the version this PATCH was made for",
            "nothing was changed",
        ],
    );
    refused_untouched(
        &child,
        &v1,
        &corrupt,
        &[&corrupt.display().to_string(), "corrupt"],
    );
    refused_untouched(
        &child,
        &v1,
        &incomplete,
        &["is incomplete", "global dropped"],
    );
    // `--to NEW` makes the same plan and refuses on the same global.
    let last = field(&wait_tick(&child, "v1 ", 0), "i");
    let pid = child.pid().to_string();
    let out = tool(
        env!("CARGO_BIN_EXE_upstare-apply"),
        &[
            "--pid".as_ref(),
            pid.as_ref(),
            "--to".as_ref(),
            v2m.as_ref(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("global dropped"), "{}", out.stderr);
    assert!(out.stderr.contains("needs a SPEC line"), "{}", out.stderr);
    keeps_its_sequence(&child, last);
    // The good PATCH still applies afterwards.
    let out = apply_patch(child.pid(), &good);
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    wait_tick(&child, "v2 ", 0);
}

#[test]
fn to_and_patch_are_mutually_exclusive() {
    let out = tool(
        env!("CARGO_BIN_EXE_upstare-apply"),
        &[
            "--pid".as_ref(),
            "1".as_ref(),
            "--to".as_ref(),
            "/x.up".as_ref(),
            "/y.patch".as_ref(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    let out = tool(
        env!("CARGO_BIN_EXE_upstare-apply"),
        &["--pid".as_ref(), "1".as_ref()],
    );
    assert_ne!(out.status.code(), Some(0), "{}", out.stderr);
}
