//! Every warning of an update is said once. Regression: an update to a
//! version that adds a global reported "global X is new" twice, in the text
//! report and in `--json`, because the mapping was decided twice (once to
//! check it, once again while computing the writes).

use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_testkit::{ExitStatus, Output, Toolchain};

const CLI: &str = env!("CARGO_BIN_EXE_upstare-apply");
const WAIT: Duration = Duration::from_secs(20);

/// A ticker; `extra` adds declarations (v2's new global) and `use_extra`
/// an expression using them in the loop.
fn ticker(version: &str, extra: &str, use_extra: &str) -> String {
    format!(
        r#"
#include <stdio.h>
#include <time.h>
long total = 0;
{extra}
int main(void) {{
    struct timespec pause = {{0, 20000000}};
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long i = 0; i < 400; i++) {{
        total += i{use_extra};
        printf("{version} tick %ld total=%ld\n", i, total);
        nanosleep(&pause, NULL);
    }}
    return 0;
}}
"#
    )
}

fn work(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("apply-warnings")
        .join(name);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

fn cli(args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(CLI);
    cmd.args(args);
    upstare_testkit::run_command(cmd, Duration::from_secs(30)).expect("run upstare-apply")
}

/// Starts v1, waits for its 3rd tick, updates it with the CLI and `args`,
/// and returns the CLI's output.
fn update_once(dir: &Path, v1: &Path, v2: &Path, args: &[&str]) -> Output {
    let child = upstare_testkit::spawn(v1, &[] as &[&str]).expect("spawn v1");
    child
        .wait_for_line("tick 3", WAIT, |l| l.starts_with("v1 tick 3 "))
        .expect("v1 ticking");
    let pid = child.pid().to_string();
    let v2_s = v2.to_str().expect("utf-8 path");
    let mut all = vec!["--pid", pid.as_str(), "--to", v2_s];
    all.extend_from_slice(args);
    let out = cli(&all);
    child
        .wait_for_line("v2 tick", WAIT, |l| l.starts_with("v2 tick "))
        .unwrap_or_else(|e| panic!("v2 never ticked in {}: {e}", dir.display()));
    out
}

#[test]
fn a_new_global_is_reported_once_in_text_and_json() {
    let dir = work("new-global");
    let v1 = upstare_testkit::compile_instrumented(
        &dir,
        "v1",
        &ticker("v1", "", ""),
        Toolchain::Gcc,
        &[],
    );
    let v2 = upstare_testkit::compile_instrumented(
        &dir,
        "v2",
        &ticker("v2", "long added_later = 7;", " + added_later"),
        Toolchain::Gcc,
        &[],
    );

    let out = update_once(&dir, &v1, &v2, &[]);
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    let said = out
        .stdout
        .lines()
        .filter(|l| l.contains("global added_later is new"))
        .count();
    assert_eq!(said, 1, "text report:\n{}", out.stdout);

    let out = update_once(&dir, &v1, &v2, &["--json"]);
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("--json output does not parse ({e}): {}", out.stdout));
    let warnings = v["warnings"].as_array().expect("warnings array");
    let said = warnings
        .iter()
        .filter(|w| {
            w.as_str()
                .is_some_and(|w| w.contains("global added_later is new"))
        })
        .count();
    assert_eq!(said, 1, "--json warnings: {warnings:?}");
}
