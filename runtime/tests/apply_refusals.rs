//! Refused or failed updates leave the process exactly as it was: a thread
//! that cannot reach an update point in time, a global whose type changed, a
//! local whose type changed — each is refused with the reason, and the
//! program's later output proves nothing changed. Killing the target in the
//! middle of an update gives a clear error, not a hang.

mod apply_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, ChildGuard, Toolchain};

const WAIT: Duration = Duration::from_secs(20);

/// Compiles `src` with gcc and instruments it as `<dir>/<name>.up`.
fn instrumented(dir: &Path, name: &str, src: &str) -> PathBuf {
    instrumented_with(dir, name, src, &[])
}

fn instrumented_with(dir: &Path, name: &str, src: &str, flags: &[&str]) -> PathBuf {
    apply_support::compile_instrumented(dir, name, src, Toolchain::Gcc, flags)
}

fn work(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("apply-refusals")
        .join(name);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// The process's memory maps and the bytes of its executable code, to
/// compare before and after a refused update.
fn snapshot(pid: u32) -> (String, Vec<u8>) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut code = Vec::new();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        let path = f.nth(3).unwrap_or("");
        if perms.contains('x') && path.ends_with(".up") {
            let (a, b) = range.split_once('-').expect("range");
            let (a, b) = (
                u64::from_str_radix(a, 16).expect("hex"),
                u64::from_str_radix(b, 16).expect("hex"),
            );
            let mut buf = vec![0u8; (b - a) as usize];
            std::os::unix::fs::FileExt::read_exact_at(&mem, &mut buf, a).expect("read code");
            code.extend(buf);
        }
    }
    (maps, code)
}

/// A program whose main thread prints a tick every 20 ms (it carries a
/// running total in a global and a local) and, with `spin`, a second thread
/// spinning in a one-line loop, which has no update point.
fn ticker(total_type: &str, local_type: &str, spin: bool) -> String {
    format!(
        r#"
#include <pthread.h>
#include <stdio.h>
#include <time.h>
{total_type} total;
static volatile int spinning = 1;
static void *spinner(void *arg) {{ (void)arg; while (spinning) ; return NULL; }}
int main(void)
{{
    pthread_t t;
    if ({spin}) pthread_create(&t, NULL, spinner, NULL);
    {local_type} step = 3;
    for (int i = 0; i < 100000; i++) {{
        total += step;
        printf("tick %d total=%ld\n", i, (long)total);
        fflush(stdout);
        struct timespec ts = {{0, 20000000}};
        nanosleep(&ts, NULL);
    }}
    return 0;
}}
"#,
        spin = i32::from(spin)
    )
}

/// The ticks keep coming after the refusal, with totals that follow from
/// the ones before it (the state was not touched).
fn assert_untouched(child: &ChildGuard, before: &(String, Vec<u8>)) {
    let after = snapshot(child.pid());
    assert_eq!(before.0, after.0, "memory maps changed");
    assert!(
        before.1 == after.1,
        "executable code changed (a breakpoint left behind?)"
    );
    let last = child.stdout_so_far().lines().count();
    child
        .wait_for_line("ticks continue", WAIT, |l| {
            l.starts_with(&format!("tick {} ", last + 2))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    for (i, l) in child.stdout_so_far().lines().enumerate() {
        assert_eq!(l, format!("tick {i} total={}", 3 * (i + 1)), "line {i}");
    }
}

#[test]
fn thread_that_cannot_reach_an_update_point_is_named() {
    let dir = work("spin");
    let v1 = instrumented(&dir, "spin", &ticker("long", "long", true));
    let copy = dir.join("spin-copy.up");
    std::fs::copy(&v1, &copy).expect("copy");
    let child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ticks", WAIT, |l| l.starts_with("tick 3 "))
        .unwrap_or_else(|e| panic!("{e}"));
    let before = snapshot(child.pid());
    let opts = ApplyOptions {
        timeout: Duration::from_millis(200),
        ..ApplyOptions::default()
    };
    let err = apply(child.pid() as i32, &copy, &opts)
        .expect_err("must be refused")
        .to_string();
    println!("{err}");
    assert!(err.contains("spinner"), "names the function: {err}");
    assert!(
        err.contains("200ms") || err.contains("within"),
        "says it timed out: {err}"
    );
    assert_untouched(&child, &before);
}

/// v1 runs; an update to v2 (whose source differs by a type) is refused with
/// a message containing every needle, and the process is untouched.
fn refused_type_change(case: &str, v2_types: (&str, &str), needles: &[&str]) {
    let dir = work(case);
    let v1 = instrumented(&dir, &format!("{case}1"), &ticker("long", "long", false));
    let v2 = instrumented(
        &dir,
        &format!("{case}2"),
        &ticker(v2_types.0, v2_types.1, false),
    );
    let child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ticks", WAIT, |l| l.starts_with("tick 3 "))
        .unwrap_or_else(|e| panic!("{e}"));
    let before = snapshot(child.pid());
    let err = apply(child.pid() as i32, &v2, &ApplyOptions::default())
        .expect_err("refused")
        .to_string();
    println!("{err}");
    for n in needles {
        assert!(err.contains(n), "message does not mention {n:?}: {err}");
    }
    assert_untouched(&child, &before);
}

/// A change of meaning (integer → floating point) has no default rule.
#[test]
fn global_type_change_of_meaning_is_refused() {
    refused_type_change(
        "global",
        ("double", "long"),
        &["global total", "type", "long", "double", "meaning"],
    );
}

#[test]
fn local_type_change_of_meaning_is_refused() {
    refused_type_change(
        "local",
        ("long", "double"),
        &["main", "local step", "type", "double", "meaning"],
    );
}

#[test]
fn missing_library_is_refused_even_by_a_dry_run() {
    let dir = work("library");
    let v1 = instrumented(&dir, "lib1", &ticker("long", "long", false));
    let v2 = instrumented_with(
        &dir,
        "lib2",
        &ticker("long", "long", false),
        &["-Wl,--no-as-needed", "-lz"],
    );
    let child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ticks", WAIT, |l| l.starts_with("tick 3 "))
        .unwrap_or_else(|e| panic!("{e}"));
    let before = snapshot(child.pid());
    for dry_run in [true, false] {
        let opts = ApplyOptions {
            dry_run,
            ..ApplyOptions::default()
        };
        let err = apply(child.pid() as i32, &v2, &opts)
            .expect_err("refused")
            .to_string();
        println!("{err}");
        assert!(
            err.contains("libz.so.1"),
            "names the library (dry run {dry_run}): {err}"
        );
    }
    assert_untouched(&child, &before);
}

#[test]
fn killing_the_target_mid_update_is_a_clear_error() {
    let dir = work("kill");
    let v1 = instrumented(&dir, "k1", &ticker("long", "long", true));
    let copy = dir.join("k1-copy.up");
    std::fs::copy(&v1, &copy).expect("copy");
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ticks", WAIT, |l| l.starts_with("tick 2 "))
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = child.pid();
    // The spinner never gets ready, so the update waits its whole timeout:
    // kill the target meanwhile.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let t = Instant::now();
    let opts = ApplyOptions {
        timeout: Duration::from_secs(10),
        ..ApplyOptions::default()
    };
    let err = apply(pid as i32, &copy, &opts)
        .expect_err("cannot succeed")
        .to_string();
    killer.join().expect("killer");
    println!("{err}");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}: {err}",
        t.elapsed()
    );
    assert!(
        err.contains(&pid.to_string()) || err.contains("exited") || err.contains("gone"),
        "says the process is gone: {err}"
    );
    child.kill();
}
