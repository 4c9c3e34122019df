//! SPEC `[safety]`: an update waits until no thread is inside a function the
//! SPEC forbids, then proceeds; if that never happens within `--timeout`, it
//! is refused naming the frame and the process goes on untouched.

use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_patcher::Spec;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_instrumented, spawn, TempDir, Toolchain};

const WAIT: Duration = Duration::from_secs(20);

/// Most of each tick is spent inside `critical` (blocked in nanosleep, so a
/// thread there is ready and would otherwise be updated there).
const PROGRAM: &str = r#"
#include <stdio.h>
#include <time.h>
long done_in_critical;
static void pause_ms(long ms) {
    struct timespec ts = {0, ms * 1000000};
    nanosleep(&ts, NULL);
}
void critical(long t) {
    /* The tick is printed on entry: a test that reacts to it catches the
       thread inside critical, so the update has to wait. */
    printf("VER tick=%ld in=%ld\n", t, done_in_critical);
    fflush(stdout);
    pause_ms(40);
    done_in_critical++;
}
void forever(void) {
    for (;;) {
        pause_ms(5);
        done_in_critical++;
    }
}
int main(int argc, char **argv) {
    if (argc > 1)
        forever();
    for (long t = 0; t < 3000; t++) {
        critical(t);
        pause_ms(4);
    }
    return 0;
}
"#;

fn build(dir: &Path, ver: &str, tc: Toolchain) -> PathBuf {
    compile_instrumented(
        dir,
        &format!("safety.{ver}.{}", tc.name()),
        &PROGRAM.replace("VER", ver),
        tc,
        &[],
    )
}

fn spec(text: &str) -> Option<(PathBuf, Spec)> {
    let path = PathBuf::from("safety.toml");
    Some((path.clone(), Spec::parse(&path, text).expect("SPEC")))
}

#[test]
fn the_update_waits_until_no_thread_is_in_a_forbidden_function() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let dir = TempDir::new("apply-safety");
        let (v1, v2) = (build(dir.path(), "v1", tc), build(dir.path(), "v2", tc));
        let mut retried = 0;
        for _ in 0..3 {
            let child = spawn(&v1, &[] as &[&str]).expect("spawn v1");
            child
                .wait_for_line("ticking", WAIT, |l| l.starts_with("v1 tick=2 "))
                .expect("v1 ticks");
            let opts = ApplyOptions {
                timeout: Duration::from_millis(3000),
                spec: spec("[safety]\ninactive = [\"critical\"]\n"),
                ..ApplyOptions::default()
            };
            let report = apply(child.pid() as i32, &v2, &opts)
                .unwrap_or_else(|e| panic!("[{}] update: {e}", tc.name()));
            for t in &report.threads {
                assert!(
                    !t.frames.iter().any(|f| f.starts_with("critical@")),
                    "[{}] updated inside critical: {:?}",
                    tc.name(),
                    t.frames
                );
            }
            retried += report.safety_retries;
            child
                .wait_for_line("v2", WAIT, |l| l.starts_with("v2 tick="))
                .expect("v2 ticks");
        }
        // Each update starts inside critical (just after its tick line):
        // it must have waited for it to return.
        assert!(
            retried >= 3,
            "[{}] waited {retried} times in 3 updates",
            tc.name()
        );
    }
}

#[test]
fn a_forbidden_function_that_never_returns_is_refused_naming_it() {
    let tc = Toolchain::Gcc;
    let dir = TempDir::new("apply-safety-never");
    let (v1, v2) = (build(dir.path(), "v1", tc), build(dir.path(), "v2", tc));
    let child = spawn(&v1, &["forever"]).expect("spawn v1");
    std::thread::sleep(Duration::from_millis(50));
    let before = std::fs::read_to_string(format!("/proc/{}/maps", child.pid())).expect("maps");
    let opts = ApplyOptions {
        timeout: Duration::from_millis(300),
        spec: spec("[safety]\ninactive = [\"forever\"]\n"),
        ..ApplyOptions::default()
    };
    let err = apply(child.pid() as i32, &v2, &opts)
        .expect_err("forever never returns")
        .to_string();
    assert!(err.contains("forever@"), "{err}");
    assert!(err.contains("SPEC forbids"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    let after = std::fs::read_to_string(format!("/proc/{}/maps", child.pid())).expect("maps");
    assert_eq!(before, after, "the mappings changed");
    // Still running: its counter keeps moving (it prints nothing in this
    // mode, so look at the process state instead).
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.pid())).expect("stat");
    let state = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next();
    assert!(matches!(state, Some("S" | "R")), "{stat}");
}
